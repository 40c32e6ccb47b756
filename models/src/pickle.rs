//! A restricted unpickler for PyTorch's `data.pkl`: it builds values, never runs code.
//!
//! It accepts what `torch.load(weights_only=True)` accepts for a state dict: primitive values,
//! tuples, lists, dicts, `collections.OrderedDict`, tensor rebuild functions and storage types.
//! Any other global (`os.system`, `builtins.eval`, …) is an error naming it, raised when the
//! pickle names it, before anything could be called. Lengths are checked against the bytes
//! left, and nesting is bounded, so hostile input cannot make it allocate or recurse without
//! limit.

/// The element types of torch storages (`torch.FloatStorage`…).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A storage a tensor views: `data/<key>` in the archive, `numel` elements of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    pub dtype: StorageDtype,
    pub key: String,
    pub numel: usize,
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: Storage,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The functions and classes a weights pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    RebuildFromType,
    Parameter,
    StorageClass(StorageDtype),
    CodecsEncode,
}

impl Global {
    fn find(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Self::RebuildParameter,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromType,
            ("torch.nn.parameter", "Parameter") | ("torch", "Tensor") => Self::Parameter,
            ("torch", class) => Self::StorageClass(StorageDtype::from_class(class)?),
            ("_codecs", "encode") => Self::CodecsEncode,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(Storage),
    Tensor(TensorRef),
}

/// Deepest nesting of tuples, lists and dicts accepted (a state dict needs 3).
const MAX_DEPTH: usize = 64;

/// Values (counting every element) that GET may copy out of the memo, per byte of pickle: a
/// real weights pickle copies little; a hostile one doubling a list per GET is stopped.
const COPY_BUDGET_PER_BYTE: usize = 16;

fn nodes(value: &Value) -> usize {
    match value {
        Value::Tuple(items) | Value::List(items) => 1 + items.iter().map(nodes).sum::<usize>(),
        Value::Dict(pairs) => 1 + pairs.iter().map(|(k, v)| nodes(k) + nodes(v)).sum::<usize>(),
        _ => 1,
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Tuple(items) | Value::List(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Dict(pairs) => 1 + pairs.iter().map(|(k, v)| depth(k).max(depth(v))).max().unwrap_or(0),
        _ => 0,
    }
}

enum Item {
    Mark,
    Value(Value),
}

struct Machine<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Item>,
    memo: std::collections::HashMap<u32, Value>,
    /// Values GET may still copy (see [`COPY_BUDGET_PER_BYTE`]).
    copy_budget: usize,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {} (needs {n} more bytes, {} left)", self.at, self.bytes.len() - self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn uint(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b)))
    }

    fn length(&mut self, n: usize) -> Result<usize, String> {
        usize::try_from(self.uint(n)?).map_err(|_| "length does not fit in memory".to_string())
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.bytes[self.at..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
        self.at += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "GLOBAL name is not UTF-8".to_string())
    }

    fn push(&mut self, value: Value) -> Result<(), String> {
        check_depth(&value)?;
        if self.stack.len() >= MAX_STACK {
            return Err(format!("more than {MAX_STACK} values on the stack"));
        }
        self.stack.push(Item::Value(value));
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Item::Value(v)) => Ok(v),
            Some(Item::Mark) => Err(format!("unexpected MARK at byte {}", self.at)),
            None => Err(format!("stack underflow at byte {}", self.at)),
        }
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Item::Value(v)) => Ok(v),
            _ => Err(format!("no value on the stack at byte {}", self.at)),
        }
    }

    /// The values above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.stack.iter().rposition(|i| matches!(i, Item::Mark)).ok_or_else(|| format!("no MARK at byte {}", self.at))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items.into_iter().map(|i| match i {
            Item::Value(v) => v,
            Item::Mark => unreachable!("the topmost mark"),
        }).collect())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let value = self.top()?.clone();
        self.spend(nodes(&value))?;
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let value = self.memo.get(&key).cloned().ok_or_else(|| format!("memo {key} is not set"))?;
        self.spend(nodes(&value))?;
        self.push(value)
    }

    fn spend(&mut self, copies: usize) -> Result<(), String> {
        self.copy_budget = self.copy_budget.checked_sub(copies).ok_or("the pickle copies more values than a weights file does (a memo bomb?)")?;
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), String> {
        let global = Global::find(module, name)
            .ok_or_else(|| format!("global '{module}.{name}' is not allowed: a weights file holds tensors only (what torch.load(weights_only=True) accepts)"))?;
        self.push(Value::Global(global))
    }

    fn set_items(dict: &mut Value, items: Vec<Value>) -> Result<(), String> {
        items.iter().try_for_each(check_depth)?;
        let Value::Dict(pairs) = dict else { return Err("SETITEMS on a value that is not a dict".into()) };
        if items.len() % 2 != 0 {
            return Err("SETITEMS with an odd number of values".into());
        }
        let mut items = items.into_iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            pairs.push((k, v));
        }
        Ok(())
    }
}

/// Runs the pickle in `bytes`; `persistent` turns a `BINPERSID` id into a value (torch's storages).
pub fn unpickle(bytes: &[u8], persistent: impl Fn(Value) -> Result<Value, String>) -> Result<Value, String> {
    unpickle_prefix(bytes, persistent).map(|(value, _)| value)
}

/// Runs the pickle at the start of `bytes` (files of several pickles back to back): its value
/// and how many bytes it took, up to and including STOP.
pub fn unpickle_prefix(bytes: &[u8], persistent: impl Fn(Value) -> Result<Value, String>) -> Result<(Value, usize), String> {
    let copy_budget = bytes.len().saturating_mul(COPY_BUDGET_PER_BYTE);
    let mut m = Machine { bytes, at: 0, stack: Vec::new(), memo: Default::default(), copy_budget };
    loop {
        let op = m.take(1)?[0];
        match op {
            0x80 => {
                m.take(1)?;
            } // PROTO
            0x95 => {
                m.take(8)?;
            } // FRAME
            b'.' => return Ok((m.pop()?, m.at)), // STOP
            b'(' => m.stack.push(Item::Mark),
            b'}' => m.push(Value::Dict(Vec::new()))?,
            b']' => m.push(Value::List(Vec::new()))?,
            b')' => m.push(Value::Tuple(Vec::new()))?,
            b'N' => m.push(Value::None)?,
            0x88 => m.push(Value::Bool(true))?,
            0x89 => m.push(Value::Bool(false))?,
            b'K' => {
                let v = m.uint(1)?;
                m.push(Value::Int(v as i64))?
            }
            b'M' => {
                let v = m.uint(2)?;
                m.push(Value::Int(v as i64))?
            }
            b'J' => {
                let v = m.uint(4)? as u32 as i32;
                m.push(Value::Int(i64::from(v)))?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a { m.length(1)? } else { m.length(4)? };
                if n > 8 {
                    return Err(format!("integer of {n} bytes at byte {}", m.at));
                }
                let raw = m.take(n)?;
                let value = raw.iter().rev().fold(0i64, |v, &b| v << 8 | i64::from(b));
                // Sign-extend from the top bit of the last byte.
                let value = if n > 0 && n < 8 && raw[n - 1] & 0x80 != 0 { value - (1i64 << (8 * n)) } else { value };
                m.push(Value::Int(value))?
            }
            b'G' => {
                let v = f64::from_be_bytes(m.take(8)?.try_into().unwrap());
                m.push(Value::Float(v))?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => m.length(4)?,
                    0x8c => m.length(1)?,
                    _ => m.length(8)?,
                };
                let text = std::str::from_utf8(m.take(n)?).map_err(|_| "a string is not UTF-8".to_string())?;
                m.push(Value::String(text.to_string()))?
            }
            b'T' | b'U' => {
                let n = if op == b'T' { m.length(4)? } else { m.length(1)? };
                let text = m.take(n)?.iter().map(|&b| char::from(b)).collect();
                m.push(Value::String(text))?
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => m.length(4)?,
                    b'C' => m.length(1)?,
                    _ => m.length(8)?,
                };
                let bytes = m.take(n)?.to_vec();
                m.push(Value::Bytes(bytes))?
            }
            b'q' => {
                let k = m.uint(1)? as u32;
                m.memo_put(k)?
            }
            b'r' => {
                let k = m.uint(4)? as u32;
                m.memo_put(k)?
            }
            0x94 => {
                let k = m.memo.len() as u32;
                m.memo_put(k)?
            }
            b'h' => {
                let k = m.uint(1)? as u32;
                m.memo_get(k)?
            }
            b'j' => {
                let k = m.uint(4)? as u32;
                m.memo_get(k)?
            }
            b'c' => {
                let module = m.line()?.to_string();
                let name = m.line()?.to_string();
                m.global(&module, &name)?
            }
            0x93 => {
                let (name, module) = (m.pop()?, m.pop()?);
                let (Value::String(module), Value::String(name)) = (module, name) else { return Err("STACK_GLOBAL needs two strings".into()) };
                m.global(&module, &name)?
            }
            b't' => {
                let items = m.pop_mark()?;
                m.push(Value::Tuple(items))?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = (0..n).map(|_| m.pop()).collect::<Result<Vec<_>, _>>()?;
                items.reverse();
                m.push(Value::Tuple(items))?
            }
            b'l' => {
                let items = m.pop_mark()?;
                m.push(Value::List(items))?
            }
            b'd' => {
                let items = m.pop_mark()?;
                let mut dict = Value::Dict(Vec::new());
                Machine::set_items(&mut dict, items)?;
                m.push(dict)?
            }
            b'a' => {
                let item = m.pop()?;
                check_depth(&item)?;
                let Value::List(list) = m.top()? else { return Err("APPEND to a value that is not a list".into()) };
                list.push(item);
            }
            b'e' => {
                let items = m.pop_mark()?;
                items.iter().try_for_each(check_depth)?;
                let Value::List(list) = m.top()? else { return Err("APPENDS to a value that is not a list".into()) };
                list.extend(items);
            }
            b's' => {
                let (v, k) = (m.pop()?, m.pop()?);
                Machine::set_items(m.top()?, vec![k, v])?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                Machine::set_items(m.top()?, items)?;
            }
            b'Q' => {
                let id = m.pop()?;
                let value = persistent(id)?;
                m.push(value)?
            }
            b'R' => {
                let (args, callable) = (m.pop()?, m.pop()?);
                let value = call(callable, args)?;
                m.push(value)?
            }
            b'b' => {
                // BUILD: the state of a rebuilt tensor (hooks, attributes) is not needed.
                m.pop()?;
            }
            other => return Err(format!("opcode 0x{other:02x} at byte {} is not supported in a weights file", m.at - 1)),
        }
    }
}

/// Values the stack may hold at once.
const MAX_STACK: usize = 1 << 20;

/// A value about to go into a container may be nested at most [`MAX_DEPTH`] levels.
fn check_depth(value: &Value) -> Result<(), String> {
    if depth(value) > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(())
}

fn int(value: &Value, what: &str) -> Result<usize, String> {
    match value {
        Value::Int(v) => usize::try_from(*v).map_err(|_| format!("{what} {v} is negative")),
        other => Err(format!("{what} is not an integer: {other:?}")),
    }
}

fn ints(value: &Value, what: &str) -> Result<Vec<usize>, String> {
    match value {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|v| int(v, what)).collect(),
        other => Err(format!("{what} is not a tuple: {other:?}")),
    }
}

/// REDUCE: an allowed callable applied to its arguments.
fn call(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(global) = callable else { return Err(format!("REDUCE on a value that is not a function: {callable:?}")) };
    let Value::Tuple(args) = args else { return Err("REDUCE arguments are not a tuple".into()) };
    match global {
        Global::OrderedDict => Ok(Value::Dict(Vec::new())),
        Global::RebuildTensor => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else { return Err("_rebuild_tensor_v2 needs 4 arguments or more".into()) };
            let Value::Storage(storage) = storage else { return Err("_rebuild_tensor_v2's first argument is not a storage".into()) };
            let (shape, stride) = (ints(shape, "a tensor size")?, ints(stride, "a tensor stride")?);
            if shape.len() != stride.len() {
                return Err(format!("tensor size {shape:?} and stride {stride:?} differ in rank"));
            }
            Ok(Value::Tensor(TensorRef { storage: storage.clone(), offset: int(offset, "a storage offset")?, shape, stride }))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(tensor @ Value::Tensor(_)) => Ok(tensor),
            _ => Err("_rebuild_parameter's first argument is not a tensor".into()),
        },
        Global::RebuildFromType => {
            // _rebuild_from_type_v2(func, new_type, args, state): func(*args) as a plain tensor.
            let mut args = args.into_iter();
            match (args.next(), args.next(), args.next()) {
                (Some(func), Some(_), Some(inner)) => call(func, inner),
                _ => Err("_rebuild_from_type_v2 needs 4 arguments".into()),
            }
        }
        Global::CodecsEncode => match args.as_slice() {
            [Value::String(text), ..] => Ok(Value::Bytes(text.chars().map(|c| c as u32 as u8).collect())),
            _ => Err("_codecs.encode needs a string".into()),
        },
        Global::Parameter | Global::StorageClass(_) => Err(format!("{global:?} cannot be called in a weights file")),
    }
}

/// torch's persistent ids: `('storage', <storage class>, key, location, numel)`, and in the legacy
/// (pre-zip) format the same with a sixth item, the view metadata, `None` since PyTorch 0.4.
pub fn torch_storage(id: Value) -> Result<Value, String> {
    let Value::Tuple(items) = id else { return Err("a persistent id that is not a tuple".into()) };
    match items.as_slice() {
        [Value::String(kind), Value::Global(Global::StorageClass(dtype)), Value::String(key), _, numel, rest @ ..]
            if kind == "storage" && matches!(rest, [] | [Value::None]) =>
        {
            Ok(Value::Storage(Storage { dtype: *dtype, key: key.clone(), numel: int(numel, "a storage size")? }))
        }
        [Value::String(kind), _, _, _, _, view] if kind == "storage" => {
            Err(format!("a storage saved as a view of another ({view:?}): PyTorch < 0.4's format is not supported"))
        }
        _ => Err(format!("unsupported persistent id {items:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_ordered_dict_of_tensors() {
        // collections.OrderedDict() then 'w' -> _rebuild_tensor_v2(storage('0', float, 6), 0, (2, 3), (3, 1), False, OrderedDict())
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03(".to_vec();
        p.extend_from_slice(b"(X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend_from_slice(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)RtRs.");
        let value = unpickle(&p, torch_storage).unwrap();
        let Value::Dict(pairs) = value else { panic!("{value:?}") };
        assert_eq!(pairs[0].0, Value::String("w".into()));
        let Value::Tensor(t) = &pairs[0].1 else { panic!() };
        assert_eq!((t.storage.dtype, t.storage.key.as_str(), t.storage.numel), (StorageDtype::F32, "0", 6));
        assert_eq!((t.offset, t.shape.as_slice(), t.stride.as_slice()), (0, &[2, 3][..], &[3, 1][..]));
    }

    #[test]
    fn legacy_persistent_ids_carry_view_metadata() {
        let id = |view: Value| {
            let items = vec![Value::String("storage".into()), Value::Global(Global::StorageClass(StorageDtype::F16)), Value::String("7".into()), Value::String("cpu".into()), Value::Int(4), view];
            torch_storage(Value::Tuple(items))
        };
        assert_eq!(id(Value::None).unwrap(), Value::Storage(Storage { dtype: StorageDtype::F16, key: "7".into(), numel: 4 }));
        let view = Value::Tuple(vec![Value::String("8".into()), Value::Int(0), Value::Int(2)]);
        assert!(id(view).unwrap_err().contains("PyTorch < 0.4"));
    }

    #[test]
    fn code_is_refused_by_name() {
        let e = unpickle(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.", torch_storage).unwrap_err();
        assert!(e.contains("global 'posix.system' is not allowed"), "{e}");
        let e = unpickle(b"\x80\x02cbuiltins\neval\n.", torch_storage).unwrap_err();
        assert!(e.contains("'builtins.eval'"), "{e}");
    }

    #[test]
    fn hostile_lengths_and_nesting_are_errors() {
        assert!(unpickle(b"X\xff\xff\xff\xff", torch_storage).unwrap_err().contains("truncated"));
        let deep = [vec![b']'; 1], vec![b'('; 200], vec![b'l'; 200], vec![b'.']].concat();
        assert!(unpickle(&deep, torch_storage).unwrap_err().contains("nested deeper"));
        assert!(unpickle(b"\x81.", torch_storage).unwrap_err().contains("opcode 0x81"));
        // A list that doubles with every GET.
        let mut bomb = b"]q\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"(h\x00h\x00lq\x00");
        }
        assert!(unpickle(&bomb, torch_storage).unwrap_err().contains("memo bomb"));
    }
}
