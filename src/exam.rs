//! `ember exam`: accuracy on multiple-choice questions (MMLU, C-Eval, CMMLU) as LLaMA-Factory's
//! `eval` scores them: each question, after `--shots` solved examples of its subject, is
//! answered by the highest of the logits of the tokens "A", "B", "C" and "D" at the prompt's
//! last position. The base is scored, then base + adapter where one is given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use ember_adapters::AdaptedModel;
use ember_data::{Conversation, Format, Message, Role, Tokenizer};
use ember_models::{BaseModel, LoadDtype};
use serde_json::{Value, json};

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    /// Files of questions, or folders of them (a subject a file).
    pub test: &'a [PathBuf],
    /// The solved examples: files or folders as `test`, matched to the test files by subject
    /// (none: no shots).
    pub dev: &'a [PathBuf],
    pub shots: usize,
    pub lang: Lang,
    /// `fewshot` (the examples one after another, as plain text) or a chat template.
    pub template: &'a str,
    /// Only the first N questions of each subject (0: all).
    pub limit: usize,
    /// Prompts a forward pass.
    pub batch: usize,
    /// Each question's answer and picks, as JSON lines.
    pub answers: Option<&'a Path>,
    pub device: &'a str,
}

/// LLaMA-Factory's two eval templates: their opening line, and how a question ends.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    fn opening(self, subject: &str) -> String {
        match self {
            Lang::En => format!("The following are multiple choice questions (with answers) about {subject}.\n\n"),
            Lang::Zh => format!("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"),
        }
    }

    fn answer_cue(self) -> &'static str {
        match self {
            Lang::En => "\nAnswer:",
            Lang::Zh => "\n答案：",
        }
    }
}

const CHOICES: [&str; 4] = ["A", "B", "C", "D"];

/// The template name for plain few-shot text (LLaMA-Factory's `fewshot`).
const FEWSHOT: &str = "fewshot";

struct Question {
    text: String,
    options: [String; 4],
    /// 0 to 3.
    answer: usize,
}

impl Question {
    /// The question and its options, up to the answer cue.
    fn prompt(&self, lang: Lang) -> String {
        let options: String = CHOICES.iter().zip(&self.options).map(|(letter, option)| format!("\n{letter}. {option}")).collect();
        format!("{}{options}{}", self.text, lang.answer_cue())
    }
}

struct Subject {
    /// The file's name without `_test`, `_val` or `_dev` and `.csv`: what matches test and dev.
    key: String,
    /// As the opening line names it.
    name: String,
    category: Option<String>,
    questions: Vec<Question>,
    shots: Vec<Question>,
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let device = crate::device(request.device)?;
    let tokenizer = ember_models::load_tokenizer(request.base)?;
    let chat = match request.template {
        FEWSHOT => None,
        name => match crate::format(name, request.base, request.adapter)? {
            Format::Chat(template) => Some(template),
            _ => return Err(bad_input(anyhow::anyhow!("--template {name}: give {FEWSHOT} or a chat template (the solved examples are turns of a conversation)"))),
        },
    };
    let subjects = load_subjects(request)?;
    let choice_ids: Vec<u32> = CHOICES
        .iter()
        .map(|letter| tokenizer.encode(letter, false)?.last().copied().ok_or_else(|| anyhow::anyhow!("the tokenizer gives no token for '{letter}'")))
        .collect::<anyhow::Result<_>>()?;
    let prompts: Vec<Vec<Vec<u32>>> = subjects
        .iter()
        .map(|subject| subject.questions.iter().map(|q| prompt_ids(&tokenizer, chat.as_ref(), request.lang, subject, q)).collect())
        .collect::<anyhow::Result<_>>()?;
    let base = AdaptedModel::base_only(BaseModel::load(request.base, LoadDtype::F32, &device)?);
    let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);
    let logits = |model: &AdaptedModel| choice_logits(model, &prompts, &choice_ids, request.batch.max(1), pad_id, &device);
    let mut picks = vec![logits(&base)];
    let mut result = json!({"test": request.test, "subjects": subjects.len(), "shots": request.shots, "template": request.template});
    if let Some(dir) = request.adapter {
        let (model, method) = crate::eval::with_adapter(base, dir, &device)?;
        picks.push(logits(&model.into_inference()));
        result["method"] = json!(method.config().name());
    }
    result["questions"] = json!(prompts.iter().map(Vec::len).sum::<usize>());
    for (name, picks) in ["base", "adapter"].iter().zip(&picks) {
        result[*name] = scores(&subjects, picks);
    }
    if let Some(path) = request.answers {
        write_answers(path, &subjects, &prompts, &picks)?;
        result["answers"] = json!(path);
    }
    result["seconds"] = json!(started.elapsed().as_secs_f64());
    println!("{result}");
    Ok(())
}

/// The prompt of `question`: the subject's opening line, the solved examples and the question,
/// as LLaMA-Factory builds it: user turns (the opening line in front of the first) and the
/// answers' letters as assistant turns. `fewshot` joins them as plain text, each answer followed
/// by a blank line, each piece tokenized on its own, no BOS; a chat template renders the turns.
fn prompt_ids(tokenizer: &Tokenizer, chat: Option<&ember_data::ChatTemplate>, lang: Lang, subject: &Subject, question: &Question) -> anyhow::Result<Vec<u32>> {
    let mut turns: Vec<(String, String)> = subject.shots.iter().map(|shot| (shot.prompt(lang), CHOICES[shot.answer].to_owned())).collect();
    turns.push((question.prompt(lang), String::new()));
    turns[0].0.insert_str(0, &lang.opening(&subject.name));
    let Some(chat) = chat else {
        let mut ids = Vec::new();
        for (i, (user, answer)) in turns.iter().enumerate() {
            ids.extend(tokenizer.encode(user, false)?);
            if i + 1 < turns.len() {
                ids.extend(tokenizer.encode(&format!("{answer}\n\n"), false)?);
            }
        }
        return Ok(ids);
    };
    let messages = turns
        .into_iter()
        .flat_map(|(user, answer)| [Message::new(Role::User, user), Message::new(Role::Assistant, answer)])
        .collect::<Vec<_>>();
    let mut conversation = Conversation::new(messages);
    conversation.messages.pop();
    chat.prompt_ids(tokenizer, &conversation).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", subject.key)))
}

/// Each question's choice logits (A to D) under `model`, subject by subject, `batch` prompts a
/// forward pass (right-padded: a row's last real position sees no padding).
fn choice_logits(model: &AdaptedModel, prompts: &[Vec<Vec<u32>>], choice_ids: &[u32], batch: usize, pad_id: u32, device: &Device) -> Vec<Vec<[f32; 4]>> {
    let virtual_tokens = model.virtual_tokens();
    prompts
        .iter()
        .map(|subject| {
            subject
                .chunks(batch)
                .flat_map(|rows| {
                    let (seq, ids, mask) = ember_data::sft::right_pad(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), pad_id);
                    let shape = [rows.len(), seq];
                    let hidden = model.hidden_states(Tensor::from_data(TensorData::new(ids, shape), device), Some(Tensor::from_data(TensorData::new(mask, shape), device)));
                    // b, v+s, h -> b, 1, h: each row's last real position.
                    let last = rows.iter().enumerate().map(|(r, ids)| hidden.clone().narrow(0, r, 1).narrow(1, virtual_tokens + ids.len() - 1, 1)).collect();
                    let logits = model.logits(Tensor::cat(last, 0)).cast(DType::F32);
                    let vocab = logits.dims()[2];
                    let logits: Vec<f32> = logits.into_data().try_into_vec::<f32>().expect("f32 logits");
                    (0..rows.len()).map(move |r| std::array::from_fn(|i| logits[r * vocab + choice_ids[i] as usize])).collect::<Vec<[f32; 4]>>()
                })
                .collect()
        })
        .collect()
}

/// The letter with the highest logit (the first of equals, as torch's argmax).
fn pick(logits: &[f32; 4]) -> usize {
    (0..4).fold(0, |best, i| if logits[i] > logits[best] { i } else { best })
}

/// Accuracy over all questions, by subject, and by category where a `mapping.json` gives them.
fn scores(subjects: &[Subject], picks: &[Vec<[f32; 4]>]) -> Value {
    let mut categories: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut by_subject = serde_json::Map::new();
    let (mut right, mut total) = (0, 0);
    for (subject, picks) in subjects.iter().zip(picks) {
        let correct = subject.questions.iter().zip(picks).filter(|(q, logits)| pick(logits) == q.answer).count();
        by_subject.insert(subject.key.clone(), json!(correct as f64 / picks.len() as f64));
        if let Some(category) = &subject.category {
            let entry = categories.entry(category).or_default();
            *entry = (entry.0 + correct, entry.1 + picks.len());
        }
        (right, total) = (right + correct, total + picks.len());
    }
    let categories: serde_json::Map<String, Value> = categories.into_iter().map(|(name, (r, t))| (name.to_owned(), json!(r as f64 / t as f64))).collect();
    json!({"accuracy": right as f64 / total as f64, "correct": right, "subjects": by_subject, "categories": categories})
}

fn write_answers(path: &Path, subjects: &[Subject], prompts: &[Vec<Vec<u32>>], picks: &[Vec<Vec<[f32; 4]>>]) -> anyhow::Result<()> {
    let mut lines = String::new();
    for (s, subject) in subjects.iter().enumerate() {
        for (q, question) in subject.questions.iter().enumerate() {
            let model = |m: usize| picks.get(m).map_or(Value::Null, |p| json!({"pick": CHOICES[pick(&p[s][q])], "logits": p[s][q]}));
            let line = json!({"subject": subject.key, "index": q, "prompt_tokens": prompts[s][q].len(), "answer": CHOICES[question.answer], "base": model(0), "adapter": model(1)});
            lines.push_str(&format!("{line}\n"));
        }
    }
    ember_models::write_file_atomically(path, lines.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The test files' subjects, each with its first `shots` solved examples from the dev files'
/// questions of the same subject, and its name and category from a `mapping.json`
/// (LLaMA-Factory's) beside the files or up to two folders up (`mmlu/mapping.json` over
/// `mmlu/data/test`), where there is one.
fn load_subjects(request: &Request) -> anyhow::Result<Vec<Subject>> {
    let tests = read_subjects(request.test)?;
    if request.shots > 0 && request.dev.is_empty() {
        return Err(bad_input(anyhow::anyhow!("--shots {} needs --dev, the solved examples", request.shots)));
    }
    let mut dev: BTreeMap<String, Vec<Question>> = read_subjects(request.dev)?.into_iter().collect();
    let mapping = mapping(&request.test[0])?;
    tests
        .into_iter()
        .map(|(key, mut questions)| {
            if request.limit > 0 {
                questions.truncate(request.limit);
            }
            let shots = match request.shots {
                0 => Vec::new(),
                n => {
                    let dev_path = request.dev[0].display();
                    let mut shots = dev.remove(&key).ok_or_else(|| bad_input(anyhow::anyhow!("{dev_path}: no dev questions of subject '{key}' for --shots {n}")))?;
                    shots.truncate(n);
                    shots
                }
            };
            let entry = mapping.get(&key);
            let name = entry.and_then(|e| e["name"].as_str()).map_or_else(|| key.replace('_', " "), str::to_owned);
            let category = entry.and_then(|e| e["category"].as_str()).map(str::to_owned);
            Ok(Subject { key, name, category, questions, shots })
        })
        .collect()
}

/// The questions of `paths` (files, the `.csv`, `.json`, `.jsonl` and `.parquet` files of
/// folders, by name, or a hub dataset's files) by subject, in the order the subjects come: a file's subject is its name
/// ([`subject_key`]) unless its records name theirs (`subject`, as in `cais/mmlu`).
fn read_subjects(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, Vec<Question>)>> {
    let mut files = Vec::new();
    // A hub dataset's file or pattern (`hf://datasets/cais/mmlu/all/test-*.parquet`) is its
    // files in the cache, downloaded first.
    for path in paths.iter().map(|path| ember_models::hub::data_files(path, ember_models::hub::Fetch::Download)).collect::<Result<Vec<_>, _>>()?.concat() {
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", path.display())))?;
            let mut found: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| format_of(p).is_some()).collect();
            if found.is_empty() {
                return Err(bad_input(anyhow::anyhow!("{}: no .csv, .json, .jsonl or .parquet files", path.display())));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path);
        }
    }
    let mut subjects: Vec<(String, Vec<Question>)> = Vec::new();
    for file in files {
        let questions = match format_of(&file) {
            Some(QuestionFormat::Records) => read_records(&file)?,
            _ => read_questions(&file)?.into_iter().map(|q| (None, q)).collect(),
        };
        for (subject, question) in questions {
            let key = subject.unwrap_or_else(|| subject_key(&file));
            match subjects.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(question),
                None => subjects.push((key, vec![question])),
            }
        }
    }
    Ok(subjects)
}

enum QuestionFormat {
    Csv,
    /// JSON, JSON Lines or Parquet records.
    Records,
}

fn format_of(path: &Path) -> Option<QuestionFormat> {
    match path.extension()?.to_str()? {
        "csv" => Some(QuestionFormat::Csv),
        "json" | "jsonl" | "parquet" => Some(QuestionFormat::Records),
        _ => None,
    }
}

/// JSON (an array), JSON Lines or Parquet question records, as the Hub's datasets hold them:
/// `{"question", "choices": [4], "answer": 0-3, "subject"}` (`cais/mmlu`) or `{"question" |
/// "Question", "A", "B", "C", "D", "answer" | "Answer": "A"-"D"}` (C-Eval, CMMLU).
fn read_records(path: &Path) -> anyhow::Result<Vec<(Option<String>, Question)>> {
    ember_data::dataset::read_values(path)?
        .iter()
        .enumerate()
        .map(|(index, record)| json_question(record).map_err(|reason| bad_input(anyhow::anyhow!("{}: record {index}: {reason}", path.display()))))
        .collect()
}

fn json_question(record: &Value) -> Result<(Option<String>, Question), String> {
    let field = |names: [&str; 2]| names.into_iter().find_map(|name| record.get(name));
    let string = |value: &Value| value.as_str().map(str::to_owned).ok_or_else(|| format!("{value} is not a string"));
    let text = field(["question", "Question"]).ok_or("no 'question'")?;
    let options: Vec<String> = match record.get("choices") {
        Some(Value::Array(choices)) if choices.len() == 4 => choices.iter().map(string).collect::<Result<_, _>>()?,
        Some(_) => return Err("'choices' must be 4 strings".into()),
        None => CHOICES.iter().map(|letter| record.get(*letter).ok_or_else(|| format!("no '{letter}' (nor 'choices')")).and_then(string)).collect::<Result<_, _>>()?,
    };
    let answer = match field(["answer", "Answer"]) {
        Some(Value::Number(n)) => n.as_u64().filter(|&i| i < 4).map(|i| i as usize).ok_or_else(|| format!("answer {n} is not 0 to 3"))?,
        Some(Value::String(letter)) => CHOICES.iter().position(|c| *c == letter.trim()).ok_or_else(|| format!("answer '{letter}' is not A, B, C or D"))?,
        _ => return Err("no 'answer' (A to D, or 0 to 3)".into()),
    };
    let subject = record.get("subject").and_then(Value::as_str).map(str::to_owned);
    let options = options.try_into().map_err(|_| "4 options needed".to_owned())?;
    Ok((subject, Question { text: string(text)?, options, answer }))
}

/// A file's subject: its name less a split's suffix (`abstract_algebra_test.csv`), or its
/// folder's name when the file is named as the Hub names a split's shards (C-Eval's
/// `accountant/test-00000-of-00001.parquet`).
fn subject_key(path: &Path) -> String {
    let name = |path: &Path| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name(path);
    if let Some((_, shard)) = stem.split_once('-')
        && let Some((index, total)) = shard.split_once("-of-")
        && [index, total].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && let Some(folder) = path.parent().filter(|f| f.file_name().is_some())
    {
        return name(folder);
    }
    ["_test", "_val", "_dev"].iter().find_map(|suffix| stem.strip_suffix(suffix)).map_or(stem.clone(), str::to_owned)
}

fn mapping(test: &Path) -> anyhow::Result<serde_json::Map<String, Value>> {
    let folder = if test.is_dir() { test } else { test.parent().unwrap_or(Path::new(".")) };
    let Some(path) = (0..3).map(|up| folder.join("../".repeat(up)).join("mapping.json")).find(|p| p.is_file()) else {
        return Ok(serde_json::Map::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", path.display())))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_input(anyhow::anyhow!("{}: not an object of subjects", path.display()))),
        Err(e) => Err(bad_input(anyhow::anyhow!("{}: malformed JSON: {e}", path.display()))),
    }
}

/// The questions of a CSV file: MMLU's six columns without a header (question, A, B, C, D,
/// answer), or a header naming `question`, `A`–`D` and `answer` in any case and order (C-Eval's
/// `id,question,A,B,C,D,answer[,explanation]`, CMMLU's `,Question,A,B,C,D,Answer`).
fn read_questions(path: &Path) -> anyhow::Result<Vec<Question>> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", path.display())))?;
    let text = String::from_utf8(bytes).map_err(|e| bad_input(anyhow::anyhow!("{}: not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to())))?;
    let rows = parse_csv(text.strip_prefix('\u{feff}').unwrap_or(&text)).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", path.display())))?;
    let Some(first) = rows.first() else { return Err(bad_input(anyhow::anyhow!("{}: no questions", path.display()))) };
    let column = |name: &str| first.iter().position(|cell| cell.trim().eq_ignore_ascii_case(name));
    let (columns, skip) = match ["question", "A", "B", "C", "D", "answer"].map(column) {
        [Some(q), Some(a), Some(b), Some(c), Some(d), Some(answer)] => ([q, a, b, c, d, answer], 1),
        _ => ([0, 1, 2, 3, 4, 5], 0),
    };
    let questions: Vec<Question> = rows
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(row, cells)| {
            let bad = |reason: String| bad_input(anyhow::anyhow!("{}: row {}: {reason}", path.display(), row + 1));
            let cell = |i: usize| cells.get(columns[i]).cloned().ok_or_else(|| bad(format!("{} columns, {} needed", cells.len(), columns.iter().max().unwrap() + 1)));
            let answer = cell(5)?;
            let answer = CHOICES.iter().position(|c| *c == answer.trim()).ok_or_else(|| bad(format!("answer '{answer}' is not A, B, C or D")))?;
            Ok(Question { text: cell(0)?, options: [cell(1)?, cell(2)?, cell(3)?, cell(4)?], answer })
        })
        .collect::<anyhow::Result<_>>()?;
    if questions.is_empty() {
        return Err(bad_input(anyhow::anyhow!("{}: no questions", path.display())));
    }
    Ok(questions)
}

/// The rows of CSV text (RFC 4180): fields split by commas, quoted fields may hold commas, line
/// breaks and doubled quotes; blank lines are skipped.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut chars, mut line) = (text.chars().peekable(), 1);
    let mut quoted_field = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if field.is_empty() && !quoted_field => {
                quoted_field = true;
                let start = line;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            line += usize::from(c == '\n');
                            field.push(c);
                        }
                        None => return Err(format!("line {start}: a quoted field never ends")),
                    }
                }
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                quoted_field = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                line += 1;
                if !(row.is_empty() && field.is_empty() && !quoted_field) {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                quoted_field = false;
            }
            c => field.push(c),
        }
    }
    if !(row.is_empty() && field.is_empty() && !quoted_field) {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_hold_commas_quotes_and_line_breaks() {
        let rows = parse_csv("a,\"b, c\",\"say \"\"hi\"\"\"\r\n\n\"two\nlines\",,x\n").unwrap();
        assert_eq!(rows, [vec!["a", "b, c", "say \"hi\""], vec!["two\nlines", "", "x"]]);
        assert!(parse_csv("a,\"open\n").unwrap_err().contains("line 1"));
    }

    proptest::proptest! {
        /// Any table written as CSV (every field quoted, quotes doubled) reads back as it was.
        #[test]
        fn csv_reads_back_what_was_written(table in proptest::collection::vec(proptest::collection::vec(".{0,12}", 1..5), 1..5)) {
            let text: String = table.iter().map(|row| row.iter().map(|f| format!("\"{}\"", f.replace('"', "\"\""))).collect::<Vec<_>>().join(",") + "\n").collect();
            proptest::prop_assert_eq!(parse_csv(&text).unwrap(), table);
        }

        #[test]
        fn csv_never_panics(text in "[a,\"\r\n ]{0,40}") {
            let _ = parse_csv(&text);
        }
    }

    #[test]
    fn subjects_match_across_splits() {
        assert_eq!(subject_key(Path::new("data/test/abstract_algebra_test.csv")), "abstract_algebra");
        assert_eq!(subject_key(Path::new("dev/accountant_dev.csv")), "accountant");
        assert_eq!(subject_key(Path::new("test/agronomy.csv")), "agronomy");
        assert_eq!(subject_key(Path::new("ceval-exam/accountant/val-00000-of-00001.parquet")), "accountant");
        assert_eq!(subject_key(Path::new("test-00000-of-00001.parquet")), "test-00000-of-00001");
    }
}
