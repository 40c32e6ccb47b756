//! Python's text forms of JSON values, as the references write them into prompts: `json.dumps`
//! (transformers' `tojson`, THUDM's tool prompts), `repr` (ChatGLM3's `tool_call(name=value)`),
//! and reading such a call back from a model's reply.

use std::sync::LazyLock;

use serde_json::{Map, Number, Value};

/// `json.dumps`'s arguments that prompts use.
pub struct JsonStyle {
    pub indent: Option<usize>,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

/// Python's `json.dumps(value, …)`: `", "` and `": "` between items (`","` and new lines with an
/// indent), keys in their order, floats as Python writes them.
pub fn json(value: &Value, style: &JsonStyle) -> String {
    let mut out = String::new();
    write_json(value, style, 0, &mut out);
    out
}

fn write_json(value: &Value, style: &JsonStyle, depth: usize, out: &mut String) {
    let string = |s: &str, out: &mut String| {
        let quoted = serde_json::to_string(s).expect("a string serializes");
        match style.ensure_ascii {
            false => out.push_str(&quoted),
            // Python escapes all but the printable ASCII characters (DEL too).
            true => quoted.encode_utf16().for_each(|unit| match char::from_u32(u32::from(unit)).filter(|c| (' '..='~').contains(c)) {
                Some(c) => out.push(c),
                None => out.push_str(&format!("\\u{unit:04x}")),
            }),
        }
    };
    // Between items: ", " on one line, or "," and a new line at the next depth's indent.
    let newline = |depth: usize, out: &mut String| {
        if let Some(indent) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    };
    let separator = if style.indent.is_some() { "," } else { ", " };
    match value {
        Value::String(s) => string(s, out),
        Value::Number(n) => out.push_str(&number(n)),
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i > 0 { separator } else { "" });
                newline(depth + 1, out);
                write_json(item, style, depth + 1, out);
            }
            newline(depth, out);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                out.push_str(if i > 0 { separator } else { "" });
                newline(depth + 1, out);
                string(key, out);
                out.push_str(": ");
                write_json(item, style, depth + 1, out);
            }
            newline(depth, out);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Python's `repr` of the value `json.loads` makes: `'text'`, `True`, `None`, `[1, 2.0]`,
/// `{'k': v}`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    let list = |items: &mut dyn Iterator<Item = (Option<&String>, &Value)>, open: char, close: char, out: &mut String| {
        out.push(open);
        for (i, (key, item)) in items.enumerate() {
            out.push_str(if i > 0 { ", " } else { "" });
            if let Some(key) = key {
                out.push_str(&string_repr(key));
                out.push_str(": ");
            }
            write_repr(item, out);
        }
        out.push(close);
    };
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => out.push_str(&string_repr(s)),
        Value::Array(items) => list(&mut items.iter().map(|v| (None, v)), '[', ']', out),
        Value::Object(map) => list(&mut map.iter().map(|(k, v)| (Some(k), v)), '{', '}', out),
    }
}

/// An integer as it is, a float as [`float`] writes it.
fn number(n: &Number) -> String {
    match n.as_f64().filter(|_| n.is_f64()) {
        Some(x) => float(x),
        None => n.to_string(),
    }
}

/// A finite float as Python's `repr` and `str` write it: the shortest digits that read back,
/// positional from 1e-4 up to 1e16 (with `.0` if whole), else `1.5e-07`, `1e+16`.
pub fn float(x: f64) -> String {
    // Rust's `{:e}` writes the same shortest digits: `d[.ddd]e[-]x`.
    let scientific = format!("{:e}", x.abs());
    let (mantissa, exponent) = scientific.split_once('e').expect("{:e} has an exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let point = exponent.parse::<i32>().expect("an integer exponent") + 1;
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if !(-3..=16).contains(&point) {
        let fraction = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let exponent = point - 1;
        return format!("{sign}{}{fraction}e{}{:02}", &digits[..1], if exponent < 0 { '-' } else { '+' }, exponent.abs());
    }
    match point {
        ..=0 => format!("{sign}0.{}{digits}", "0".repeat(point.unsigned_abs() as usize)),
        p if p as usize >= digits.len() => format!("{sign}{digits}{}.0", "0".repeat(p as usize - digits.len())),
        p => format!("{sign}{}.{}", &digits[..p as usize], &digits[p as usize..]),
    }
}

/// Characters `str.isprintable` rejects (Unicode's other and separator categories), which
/// `repr` escapes; the space is the one separator it keeps.
static NOT_PRINTABLE: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"[\p{Cc}\p{Cf}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]").expect("a valid class"));

/// Python's `repr(str)`: single quotes unless the text has one and no double quote; `\\`, the
/// quote, `\t`, `\n`, `\r` escaped, and other unprintable characters as `\xhh`, `\uhhhh` or
/// `\Uhhhhhhhh`.
fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::from(quote);
    let mut buffer = [0u8; 4];
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => out.extend(['\\', c]),
            ' ' => out.push(' '),
            c if NOT_PRINTABLE.is_match(c.encode_utf8(&mut buffer)) => match u32::from(c) {
                code @ ..0x100 => out.push_str(&format!("\\x{code:02x}")),
                code @ ..0x10000 => out.push_str(&format!("\\u{code:04x}")),
                code => out.push_str(&format!("\\U{code:08x}")),
            },
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `function(name=value, …)` with Python literal values (what [`repr`] writes) read back into
/// the name and a JSON object of the arguments; `None` for anything else.
pub fn read_call(text: &str) -> Option<(String, Map<String, Value>)> {
    let mut reader = Reader { text: text.trim(), at: 0, depth: 0 };
    let function = reader.identifier()?;
    reader.expect('(')?;
    let mut arguments = Map::new();
    reader.sequence(')', |reader| {
        let name = reader.identifier()?;
        reader.expect('=')?;
        arguments.insert(name, reader.value()?);
        Some(())
    })?;
    reader.skip_space();
    (reader.at == reader.text.len()).then_some((function, arguments))
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
    /// Lists and dicts open around the value being read, at most [`MAX_DEPTH`]: a generated
    /// reply nested deeper is not read as a call rather than overflowing the stack.
    depth: usize,
}

const MAX_DEPTH: usize = 128;

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        self.at = self.text.len() - self.rest().trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        let found = self.rest().starts_with(c);
        self.at += if found { c.len_utf8() } else { 0 };
        found
    }

    fn expect(&mut self, c: char) -> Option<()> {
        self.eat(c).then_some(())
    }

    /// Items read by `item`, separated by commas (one may trail), up to and through `close`.
    fn sequence(&mut self, close: char, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        while !self.eat(close) {
            item(self)?;
            if !self.eat(',') {
                return self.expect(close);
            }
        }
        Some(())
    }

    fn identifier(&mut self) -> Option<String> {
        self.skip_space();
        let length = self.rest().find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(self.rest().len());
        let name = &self.rest()[..length];
        (!name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit())).then(|| {
            self.at += length;
            name.to_string()
        })
    }

    fn value(&mut self) -> Option<Value> {
        self.skip_space();
        let close = match self.rest().chars().next()? {
            '\'' | '"' => return self.string().map(Value::String),
            '[' | '(' | '{' if self.depth == MAX_DEPTH => return None,
            '[' => ']',
            '(' => ')',
            '{' => return self.dict(),
            c if c == '-' || c == '.' || c.is_ascii_digit() => return self.number(),
            _ => {
                return match self.identifier()?.as_str() {
                    "True" => Some(Value::Bool(true)),
                    "False" => Some(Value::Bool(false)),
                    "None" => Some(Value::Null),
                    _ => None,
                };
            }
        };
        self.at += 1;
        self.depth += 1;
        let mut items = Vec::new();
        self.sequence(close, |reader| Some(items.push(reader.value()?)))?;
        self.depth -= 1;
        Some(Value::Array(items))
    }

    fn dict(&mut self) -> Option<Value> {
        self.expect('{')?;
        self.depth += 1;
        let mut map = Map::new();
        self.sequence('}', |reader| {
            reader.skip_space();
            let key = reader.string()?;
            reader.expect(':')?;
            map.insert(key, reader.value()?);
            Some(())
        })?;
        self.depth -= 1;
        Some(Value::Object(map))
    }

    fn number(&mut self) -> Option<Value> {
        let length = self.rest().find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E' | '_'))).unwrap_or(self.rest().len());
        let literal = self.rest()[..length].replace('_', "");
        self.at += length;
        let integer = !literal.contains(['.', 'e', 'E']);
        if integer {
            return literal.parse::<i64>().ok().map(Value::from);
        }
        Number::from_f64(literal.parse::<f64>().ok()?).map(Value::Number)
    }

    /// A quoted string with the escapes `repr` writes (and `\'`, `\"`, `\0`).
    fn string(&mut self) -> Option<String> {
        let quote = self.rest().chars().next().filter(|c| matches!(c, '\'' | '"'))?;
        let mut chars = self.rest()[1..].char_indices();
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.at += 1 + i + 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    let mut code = |digits: usize| {
                        let hex: String = (0..digits).filter_map(|_| chars.next().map(|(_, c)| c)).collect();
                        u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == digits).and_then(char::from_u32)
                    };
                    out.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        'x' => code(2)?,
                        'u' => code(4)?,
                        'U' => code(8)?,
                        '\\' | '\'' | '"' => escaped,
                        _ => return None,
                    });
                }
                '\n' => return None,
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each value's `repr` as Python 3.11 prints it.
    #[test]
    fn repr_writes_what_python_writes() {
        let cases = [
            (serde_json::json!("It's \"quoted\"\n\tand \\ slashed"), r#"'It\'s "quoted"\n\tand \\ slashed'"#),
            (serde_json::json!("it's"), r#""it's""#),
            (serde_json::json!("北京\u{3000}天安门 a\u{200b}b 😀 \u{1}\u{7f} café\u{a0}ü"), r"'北京\u3000天安门 a\u200bb 😀 \x01\x7f café\xa0ü'"),
            (serde_json::json!({"k": [1, 2.0, false, null, -2]}), "{'k': [1, 2.0, False, None, -2]}"),
            (serde_json::json!([0.1, 1e20, 1.5e-7, 1e16, 1e15, 0.0001, 0.00001, -3.25, 123456.789]), "[0.1, 1e+20, 1.5e-07, 1e+16, 1000000000000000.0, 0.0001, 1e-05, -3.25, 123456.789]"),
        ];
        for (value, expected) in cases {
            assert_eq!(repr(&value), expected);
        }
    }

    #[test]
    fn calls_read_back_what_repr_writes() {
        let arguments = serde_json::json!({"text": "It's \"quoted\"\n\\", "cn": "北京\u{3000}", "n": -3, "x": 1.5e-7, "ok": true, "none": null, "list": [1, "a"], "d": {"k": {}}});
        let text = format!("tool_call({})", arguments.as_object().unwrap().iter().map(|(k, v)| format!("{k}={}", repr(v))).collect::<Vec<_>>().join(", "));
        let (name, read) = read_call(&text).unwrap();
        assert_eq!((name.as_str(), Value::Object(read)), ("tool_call", arguments));
        assert_eq!(read_call(" f( a = (1, 2,), ) ").unwrap().1, *serde_json::json!({"a": [1, 2]}).as_object().unwrap());
        assert_eq!(read_call("f()").unwrap().1, Map::new());
        let deep = |depth: usize| format!("f(a={}{})", "[".repeat(depth), "]".repeat(depth));
        assert!(read_call(&deep(MAX_DEPTH)).is_some());
        assert_eq!(read_call(&deep(MAX_DEPTH + 1)), None);
        assert_eq!(read_call(&deep(1_000_000)), None);
        for bad in ["f(1)", "f(a=b)", "f(a='x'", "f(a='x') trailing", "import os", "f(a='\\q')"] {
            assert_eq!(read_call(bad), None, "{bad}");
        }
    }
}
