//! The `print fmt:` of an event format, read the way libtraceevent 1.7.1 (the library of
//! Debian 12's trace-cmd 3.1.6) reads it, to refuse what crashes or hangs it and to note what
//! each record must satisfy before it may be printed with it.
//!
//! libtraceevent parses the arguments with recursive functions (one level per operator or
//! bracket, ~300 bytes of stack each: a few tens of thousands of levels overflow an 8 MiB stack),
//! folds `x / 0` into a SIGFPE, dereferences the pointer argument of plugin print functions, and
//! prints `__print_hex`/`__print_array` lengths, `*` widths and `__get_str` strings without
//! checking them against the record. The text is first split into tokens as libtraceevent's
//! `__read_token` does, so that what we judge is what it parses.

use super::{
    Field, MAX_PRINT_FMT, MAX_PRINT_FMT_EXPR_DEPTH, MAX_PRINT_FMT_NESTING, MAX_PRINT_WIDTH,
    PLUGIN_POINTER_READ,
};

/// One token of libtraceevent's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tok {
    /// `[A-Za-z0-9_]+`: identifiers and numbers.
    Item(String),
    /// One or more adjacent string literals, concatenated, escapes kept as written.
    Str(String),
    /// A character literal.
    Char,
    /// `(`, `)` or `,`.
    Delim(u8),
    /// Anything else: `->`, `<<`, `[`, `{`, `?`, ...
    Op(String),
}

impl Tok {
    fn is_op(&self, op: &str) -> bool {
        matches!(self, Tok::Op(o) if o == op)
    }

    fn is_delim(&self, d: u8) -> bool {
        matches!(self, Tok::Delim(c) if *c == d)
    }

    fn opens(&self) -> bool {
        self.is_delim(b'(') || self.is_op("[") || self.is_op("{")
    }

    fn closes(&self) -> bool {
        self.is_delim(b')') || self.is_op("]") || self.is_op("}")
    }
}

/// Splits `text` as libtraceevent's `__read_token` does (a raw tab ends a string literal, as
/// for it; real formats have such tabs). The flag is false when a literal is never closed:
/// libtraceevent's parse fails there, after reading the tokens before it.
pub(super) fn tokenize(text: &str) -> (Vec<Tok>, bool) {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while bytes
                .get(i)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                i += 1;
            }
            tokens.push(Tok::Item(text[start..i].to_owned()));
        } else if c == b'"' || c == b'\'' {
            let mut content = String::new();
            loop {
                let Some(end) = literal_end(bytes, i) else {
                    return (tokens, false);
                };
                content.push_str(&text[i + 1..end]);
                i = end + 1;
                // libtraceevent joins a string with the next one when only spaces separate them.
                let next = i + bytes[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                if c == b'"' && bytes.get(next) == Some(&b'"') {
                    i = next;
                } else {
                    break;
                }
            }
            tokens.push(if c == b'"' {
                Tok::Str(content)
            } else {
                Tok::Char
            });
        } else if matches!(c, b'(' | b')' | b',') {
            tokens.push(Tok::Delim(c));
            i += 1;
        } else {
            let len = op_len(bytes, i);
            tokens.push(Tok::Op(text[i..i + len].to_owned()));
            i += len;
        }
    }
    (tokens, true)
}

/// Index of the byte that ends the literal opened at `start`: its closing quote, or, as
/// libtraceevent reads it, a raw control character other than a newline (dropped, and what
/// follows is read as code).
fn literal_end(bytes: &[u8], start: usize) -> Option<usize> {
    let quote = bytes[start];
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => return None,
            Some(b'\\') => i += 2,
            Some(&b) if b == quote || (b != b'\n' && !(b' '..=b'~').contains(&b)) => {
                return Some(i)
            }
            Some(_) => i += 1,
        }
    }
}

/// Length of the operator at `i`, joined as `__read_token` joins them (`->`, `<<=`, `!=`...).
fn op_len(bytes: &[u8], i: usize) -> usize {
    let c = bytes[i];
    let next = bytes.get(i + 1).copied();
    let equal_after = |at: usize| usize::from(bytes.get(at) == Some(&b'='));
    match c {
        b'-' if next == Some(b'>') => 2,
        b'-' | b'+' | b'|' | b'&' if next == Some(c) => 2,
        b'<' | b'>' if next == Some(c) => 2 + equal_after(i + 2),
        b'-' | b'+' | b'|' | b'&' | b'<' | b'>' | b'!' | b'=' => 1 + equal_after(i + 1),
        _ => 1,
    }
}

/// What a record must satisfy to be printed with this format, beyond its fields fitting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Rules {
    /// Fields that `__get_str`/`__get_rel_str` print with `%s` (indices into the fields).
    pub string_fields: Vec<usize>,
    /// Bytes that `__print_hex`, `__print_hex_str` and `__print_array` read.
    pub spans: Vec<Span>,
    /// Dynamic arrays whose address a plugin print function dereferences, and how far.
    pub pointers: Vec<(usize, usize)>,
    /// `*` arguments of conversions: the expression and the largest value allowed.
    pub stars: Vec<(Expr, i64)>,
}

/// Where a `__print_hex`/`__print_array` reads from, and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Span {
    pub base: Base,
    pub count: Expr,
    /// `None` for hex (one byte per count), else `__print_array`'s element size.
    pub element: Option<Expr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Base {
    /// `REC->field`: at the field's offset.
    Field(usize),
    /// `__get_dynamic_array(field)`: where the field's dynamic data starts.
    Dynamic(usize),
}

/// A length expression we can evaluate per record: one operand, or two joined by one operator
/// (so that libtraceevent's precedence, right-associative within a level, cannot differ from
/// ours), optionally in parentheses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Expr {
    pub left: Operand,
    pub right: Option<(BinOp, Operand)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operand {
    Number(u64),
    /// `REC->field`, read as libtraceevent reads it (0 when outside the record).
    Field(usize),
    /// `__get_dynamic_array_len(field)`.
    DynamicLen(usize),
    /// `sizeof(long)`: the guest's long.
    SizeofLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Shl,
    Shr,
    And,
    Or,
    Xor,
}

/// Checks a print fmt (the text after `print fmt:`) against the limits and the crash rules, and
/// returns what every record of the event must satisfy.
pub(super) fn check(text: &str, fields: &[Field], n_common: usize) -> Result<Rules, String> {
    if text.len() > MAX_PRINT_FMT {
        return Err(format!(
            "print fmt has {} bytes, more than {MAX_PRINT_FMT}",
            text.len()
        ));
    }
    let (tokens, complete) = tokenize(text);
    let Some(Tok::Str(format)) = tokens.first() else {
        // libtraceevent gives up on a print fmt that does not start with a string and prints
        // the raw fields instead: nothing of it is evaluated.
        return Ok(Rules::default());
    };
    // It parses arguments only after a comma, up to where its parse fails.
    let args = match tokens.get(1) {
        Some(t) if t.is_delim(b',') => &tokens[2..],
        _ => &[][..],
    };
    check_shape(args, complete)?;
    let lookup = Lookup { fields, n_common };
    check_divisions(args, &lookup)?;
    if !complete {
        // The parse fails at the unclosed literal: the event prints as raw fields.
        return Ok(Rules::default());
    }
    check_indexing(args)?;
    let mut rules = Rules::default();
    check_calls(args, &lookup, &mut rules)?;
    let top = split_args(args);
    check_conversions(format, &top, &lookup, &mut rules)?;
    Ok(rules)
}

/// Brackets balanced (unless an unclosed literal cuts the text) and nested at most
/// [`MAX_PRINT_FMT_NESTING`] deep; and a bound on libtraceevent's recursion: along any path into
/// the brackets, the tokens since the last comma of each level, summed (an operator chain like
/// `!!!!x` or `a+a+...` recurses once per token; comma-separated lists are read in loops).
fn check_shape(tokens: &[Tok], complete: bool) -> Result<(), String> {
    let mut open: Vec<&Tok> = Vec::new();
    let mut since_comma: Vec<usize> = vec![0];
    let mut depth = 0usize;
    for (i, tok) in tokens.iter().enumerate() {
        if tok.is_delim(b',') {
            let level = since_comma.last_mut().expect("never empty");
            depth -= *level;
            *level = 0;
        } else if tok.closes() {
            let Some(opener) = open.pop() else {
                return Err(format!(
                    "token {i}: a closing bracket without its opening one"
                ));
            };
            let pair = matches!((opener, tok), (Tok::Delim(b'('), Tok::Delim(b')')))
                || (opener.is_op("[") && tok.is_op("]"))
                || (opener.is_op("{") && tok.is_op("}"));
            if !pair {
                return Err(format!("token {i}: brackets do not match"));
            }
            depth -= since_comma.pop().expect("pushed with its opener");
        } else {
            *since_comma.last_mut().expect("never empty") += 1;
            depth += 1;
            if tok.opens() {
                open.push(tok);
                if open.len() > MAX_PRINT_FMT_NESTING {
                    return Err(format!(
                        "brackets nested more than {MAX_PRINT_FMT_NESTING} deep"
                    ));
                }
                since_comma.push(0);
            }
        }
        if depth + since_comma.len() > MAX_PRINT_FMT_EXPR_DEPTH {
            return Err(format!(
                "expression deeper than {MAX_PRINT_FMT_EXPR_DEPTH} (operator chain or nesting)"
            ));
        }
    }
    if complete && !open.is_empty() {
        return Err(format!("{} brackets are never closed", open.len()));
    }
    Ok(())
}

/// Field lookups as libtraceevent does them.
struct Lookup<'a> {
    fields: &'a [Field],
    n_common: usize,
}

impl Lookup<'_> {
    /// `tep_find_any_field`: common fields first, then the event's.
    fn any(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// `tep_find_field`: the event's own fields only (used for dynamic arrays).
    fn event(&self, name: &str) -> Option<usize> {
        self.fields[self.n_common..]
            .iter()
            .position(|f| f.name == name)
            .map(|i| i + self.n_common)
    }
}

/// Every `/` and `%` must divide by a positive literal or `sizeof` that nothing binds tighter
/// to: libtraceevent folds `x / 0` at load time (SIGFPE), evaluates a name as 0, reads `-1` as
/// `0 - 1`, and groups `a / 2 * 0` as `a / (2 * 0)`.
fn check_divisions(args: &[Tok], lookup: &Lookup) -> Result<(), String> {
    for (i, tok) in args.iter().enumerate() {
        if !(tok.is_op("/") || tok.is_op("%")) {
            continue;
        }
        let bad = || format!("division by something other than a positive constant at token {i}");
        let (value, after) = match args.get(i + 1) {
            Some(Tok::Item(item)) if item == "sizeof" => {
                let (close, size) = sizeof_at(args, i + 1, lookup).ok_or_else(bad)?;
                (size.unwrap_or(8), close + 1)
            }
            Some(Tok::Item(item)) => (number(item).ok_or_else(bad)?, i + 2),
            _ => return Err(bad()),
        };
        if value == 0 {
            return Err(bad());
        }
        let binds_tighter = args.get(after).is_some_and(|t| {
            ["*", "/", "%", "[", ".", "->", "++", "--"]
                .iter()
                .any(|op| t.is_op(op))
                || t.is_delim(b'(')
        });
        if binds_tighter {
            return Err(bad());
        }
    }
    Ok(())
}

/// `sizeof ( ... )` starting at `at`: the index of its `)` and its size (`None` for `long`,
/// whose size is the guest's).
fn sizeof_at(args: &[Tok], at: usize, lookup: &Lookup) -> Option<(usize, Option<u64>)> {
    if !args.get(at + 1)?.is_delim(b'(') {
        return None;
    }
    let close = at + 1 + args[at + 1..].iter().position(|t| t.is_delim(b')'))?;
    let inner = &args[at + 2..close];
    let words: Vec<&str> = inner
        .iter()
        .map(|t| match t {
            Tok::Item(w) => Some(w.as_str()),
            Tok::Op(o) if o == "->" => Some("->"),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let size = match words.as_slice() {
        ["int"] | ["unsigned"] | ["unsigned", "int"] => Some(4),
        ["long"] | ["unsigned", "long"] => None,
        ["long", "long"] | ["unsigned", "long", "long"] => Some(8),
        ["u8" | "s8"] => Some(1),
        ["u16" | "s16"] => Some(2),
        ["u32" | "s32"] => Some(4),
        ["u64" | "s64"] => Some(8),
        ["REC", "->", name] => {
            let field = &lookup.fields[lookup.any(name)?];
            if field.array || field.size == 0 {
                return None;
            }
            Some(u64::from(field.size))
        }
        _ => return None,
    };
    Some((close, size))
}

/// `strtoull(item, NULL, 0)` as libtraceevent evaluates a numeric token (`1000L` is 1000, `010`
/// is 8); `None` if the token does not start with a digit.
pub(super) fn number(item: &str) -> Option<u64> {
    let bytes = item.as_bytes();
    if !bytes.first()?.is_ascii_digit() {
        return None;
    }
    let (radix, digits) = match bytes {
        [b'0', b'x' | b'X', rest @ ..] if rest.first().is_some_and(u8::is_ascii_hexdigit) => {
            (16, rest)
        }
        [b'0', rest @ ..] => (8, rest),
        _ => (10, bytes),
    };
    let mut value: u64 = 0;
    for &b in digits {
        let Some(d) = char::from(b).to_digit(radix) else {
            break;
        };
        // strtoull saturates.
        value = value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(d)))
            .unwrap_or(u64::MAX);
    }
    Some(value)
}

/// An index into `REC->field`, `__get_dynamic_array(field)` or a parenthesized expression must
/// be a small literal: libtraceevent bounds the read, but computes its offset in an `int` that a
/// large index overflows. Indexing anything else (`__get_str(msg)[0]`, an array of the print fmt
/// itself) reads no record bytes.
fn check_indexing(args: &[Tok]) -> Result<(), String> {
    for (i, tok) in args.iter().enumerate() {
        if !tok.is_op("[") || i == 0 {
            continue;
        }
        let reads_record = match &args[i - 1] {
            Tok::Item(_) => i >= 2 && args[i - 2].is_op("->"),
            close if close.is_delim(b')') => {
                let open = matching_open(args, i - 1);
                match open.and_then(|o| o.checked_sub(1)).map(|o| &args[o]) {
                    Some(Tok::Item(call)) => {
                        call == "__get_dynamic_array" || call == "__get_rel_dynamic_array"
                    }
                    _ => true, // a parenthesized expression: it may be a field
                }
            }
            _ => false,
        };
        if !reads_record {
            continue;
        }
        let literal = match (args.get(i + 1), args.get(i + 2)) {
            (Some(Tok::Item(k)), Some(close)) if close.is_op("]") => number(k),
            _ => None,
        };
        if literal.is_none_or(|k| k >= u64::from(super::MAX_FIELD_END / 8)) {
            return Err(format!(
                "token {i}: a field indexed by something other than a small constant"
            ));
        }
    }
    Ok(())
}

/// The calls that read past what libtraceevent checks: `__get_str`, `__print_hex`,
/// `__print_hex_str`, `__print_array`, and the plugin functions that dereference a pointer.
fn check_calls(args: &[Tok], lookup: &Lookup, rules: &mut Rules) -> Result<(), String> {
    for (i, tok) in args.iter().enumerate() {
        let Tok::Item(name) = tok else { continue };
        if !args.get(i + 1).is_some_and(|t| t.is_delim(b'(')) {
            continue;
        }
        let Some(close) = matching_close(args, i + 1) else {
            continue; // check_shape already refused unbalanced text
        };
        let call_args = split_args(&args[i + 2..close]);
        let arity = |n: usize| {
            if call_args.len() == n {
                Ok(())
            } else {
                Err(format!("{name}() with {} arguments", call_args.len()))
            }
        };
        match name.as_str() {
            "__get_str" | "__get_rel_str" => {
                arity(1)?;
                if let [Tok::Item(field)] = call_args[0] {
                    // A field that does not exist prints nothing.
                    rules.string_fields.extend(lookup.any(field));
                }
            }
            "__print_hex" | "__print_hex_str" | "__print_array" => {
                let array = name == "__print_array";
                arity(if array { 3 } else { 2 })?;
                let base =
                    span_base(call_args[0], lookup).map_err(|why| format!("{name}(): {why}"))?;
                let count =
                    parse_expr(call_args[1], lookup).map_err(|why| format!("{name}(): {why}"))?;
                let element = if array {
                    Some(
                        parse_expr(call_args[2], lookup)
                            .map_err(|why| format!("{name}(): {why}"))?,
                    )
                } else {
                    None
                };
                if let Some(base) = base {
                    rules.spans.push(Span {
                        base,
                        count,
                        element,
                    });
                }
            }
            // plugin_cfg80211 reads two bytes at its pointer; plugin_scsi a CDB of up to 32.
            "__le16_to_cpup" | "scsi_trace_parse_cdb" => {
                let (at, bytes) = if name == "__le16_to_cpup" {
                    arity(1)?;
                    (0, 2)
                } else {
                    arity(3)?;
                    (1, PLUGIN_POINTER_READ)
                };
                match span_base(call_args[at], lookup) {
                    Ok(Some(Base::Dynamic(field))) => rules.pointers.push((field, bytes)),
                    Ok(None) => {} // unknown field: libtraceevent fails to parse the print fmt
                    _ => {
                        return Err(format!(
                            "{name}() dereferences something other than __get_dynamic_array()"
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Index of the bracket opening the one that closes at `close`.
fn matching_open(tokens: &[Tok], close: usize) -> Option<usize> {
    let mut depth = 0usize;
    for i in (0..=close).rev() {
        if tokens[i].closes() {
            depth += 1;
        } else if tokens[i].opens() {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// Index of the `)` closing the `(` at `open`.
fn matching_close(tokens: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, tok) in tokens.iter().enumerate().skip(open) {
        if tok.opens() {
            depth += 1;
        } else if tok.closes() {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// Splits a token list at its top-level commas.
fn split_args(tokens: &[Tok]) -> Vec<&[Tok]> {
    if tokens.is_empty() {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, tok) in tokens.iter().enumerate() {
        if tok.opens() {
            depth += 1;
        } else if tok.closes() {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && tok.is_delim(b',') {
            parts.push(&tokens[start..i]);
            start = i + 1;
        }
    }
    parts.push(&tokens[start..]);
    parts
}

/// The first argument of `__print_hex` and friends: `REC->f` or `__get_dynamic_array(f)`.
/// `Ok(None)` when the field does not exist (libtraceevent then reads nothing).
fn span_base(tokens: &[Tok], lookup: &Lookup) -> Result<Option<Base>, String> {
    match tokens {
        [Tok::Item(rec), arrow, Tok::Item(field)] if rec == "REC" && arrow.is_op("->") => {
            Ok(lookup.any(field).map(Base::Field))
        }
        [Tok::Item(call), open, Tok::Item(field), close]
            if (call == "__get_dynamic_array" || call == "__get_rel_dynamic_array")
                && open.is_delim(b'(')
                && close.is_delim(b')') =>
        {
            Ok(lookup.event(field).map(Base::Dynamic))
        }
        _ => Err("the data must be REC->field or __get_dynamic_array(field)".into()),
    }
}

/// Parses a length expression of the restricted form [`Expr`] describes.
fn parse_expr(tokens: &[Tok], lookup: &Lookup) -> Result<Expr, String> {
    let mut tokens = tokens;
    while tokens.first().is_some_and(|t| t.is_delim(b'('))
        && matching_close(tokens, 0) == Some(tokens.len() - 1)
    {
        tokens = &tokens[1..tokens.len() - 1];
    }
    let (left, rest) = parse_operand(tokens, lookup)?;
    if rest.is_empty() {
        return Ok(Expr { left, right: None });
    }
    let op = match &rest[0] {
        Tok::Op(op) => match op.as_str() {
            "+" => BinOp::Add,
            "-" => BinOp::Sub,
            "*" => BinOp::Mul,
            "/" => BinOp::Div,
            "%" => BinOp::Rem,
            "<<" => BinOp::Shl,
            ">>" => BinOp::Shr,
            "&" => BinOp::And,
            "|" => BinOp::Or,
            "^" => BinOp::Xor,
            _ => return Err(format!("cannot bound a length using {op:?}")),
        },
        _ => return Err("cannot bound a length of this form".into()),
    };
    let (right, rest) = parse_operand(&rest[1..], lookup)?;
    if !rest.is_empty() {
        return Err("cannot bound a length with more than one operator".into());
    }
    Ok(Expr {
        left,
        right: Some((op, right)),
    })
}

fn parse_operand<'t>(tokens: &'t [Tok], lookup: &Lookup) -> Result<(Operand, &'t [Tok]), String> {
    let unknown = |name: &str| format!("no field {name:?} for a length");
    match tokens {
        [Tok::Item(rec), arrow, Tok::Item(field), rest @ ..]
            if rec == "REC" && arrow.is_op("->") =>
        {
            let index = lookup.any(field).ok_or_else(|| unknown(field))?;
            Ok((Operand::Field(index), rest))
        }
        [Tok::Item(call), open, Tok::Item(field), close, rest @ ..]
            if (call == "__get_dynamic_array_len" || call == "__get_rel_dynamic_array_len")
                && open.is_delim(b'(')
                && close.is_delim(b')') =>
        {
            let index = lookup.event(field).ok_or_else(|| unknown(field))?;
            Ok((Operand::DynamicLen(index), rest))
        }
        [Tok::Item(call), ..] if call == "sizeof" => {
            let (close, size) = sizeof_at(tokens, 0, lookup)
                .ok_or_else(|| "cannot bound a length using this sizeof()".to_owned())?;
            let operand = size.map_or(Operand::SizeofLong, Operand::Number);
            Ok((operand, &tokens[close + 1..]))
        }
        [Tok::Item(item), rest @ ..] => {
            let value =
                number(item).ok_or_else(|| format!("cannot bound a length using {item:?}"))?;
            Ok((Operand::Number(value), rest))
        }
        _ => Err("cannot bound a length of this form".into()),
    }
}

/// Walks the format string as libtraceevent's `parse_args` does, pairing each conversion with
/// its argument: static widths are bounded here, `*` arguments per record.
fn check_conversions(
    format: &str,
    args: &[&[Tok]],
    lookup: &Lookup,
    rules: &mut Rules,
) -> Result<(), String> {
    let fmt = format.as_bytes();
    let mut next_arg = 0usize;
    let mut i = 0;
    while i < fmt.len() {
        if fmt[i] != b'%' || fmt.get(i + 1) == Some(&b'%') {
            // parse_arg_string: text up to the next lone `%`; a backslash hides the next byte.
            while i < fmt.len() {
                match fmt[i] {
                    b'\\' => i += 2,
                    b'%' if fmt.get(i + 1) == Some(&b'%') => i += 2,
                    b'%' => break,
                    _ => i += 1,
                }
            }
            continue;
        }
        let start = i;
        i += 1;
        let mut star: Option<(usize, bool)> = None;
        let mut precision = false;
        let kind = loop {
            let Some(&c) = fmt.get(i) else {
                break Conversion::Failed;
            };
            i += 1;
            match c {
                b'#' | b'h' | b'l' | b'L' | b'z' | b'Z' | b'-' | b'0'..=b'9' => {}
                b'.' => precision = true,
                b'*' => {
                    if star.is_some() || next_arg >= args.len() {
                        break Conversion::Failed;
                    }
                    star = Some((next_arg, precision));
                    next_arg += 1;
                }
                b'p' => {
                    i += pointer_suffix(&fmt[i..]);
                    break Conversion::Pointer;
                }
                b'd' | b'u' | b'i' | b'x' | b'X' | b'o' => break Conversion::Number,
                b's' => break Conversion::String,
                _ => break Conversion::Literal,
            }
        };
        check_static_width(&fmt[start..i.min(fmt.len())])?;
        if kind == Conversion::Failed {
            // libtraceevent marks the event FAILED and prints raw fields: nothing more is used.
            return Ok(());
        }
        if kind != Conversion::Literal {
            if next_arg >= args.len() {
                return Ok(()); // "no argument match": FAILED as above
            }
            next_arg += 1;
        }
        if let Some((arg, is_precision)) = star {
            let limit = match kind {
                Conversion::Number => Some(i64::from(MAX_PRINT_WIDTH)),
                Conversion::String if !is_precision => Some(i64::from(MAX_PRINT_WIDTH)),
                Conversion::String | Conversion::Pointer => Some(i64::from(i32::MAX)),
                Conversion::Literal | Conversion::Failed => None,
            };
            if let Some(limit) = limit {
                let expr = parse_expr(args[arg], lookup)
                    .map_err(|why| format!("`*` argument {}: {why}", arg + 1))?;
                rules.stars.push((expr, limit));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conversion {
    Number,
    String,
    Pointer,
    /// An unknown conversion letter: printed as text, takes no argument.
    Literal,
    /// libtraceevent gives up on the print fmt.
    Failed,
}

/// How many letters after `%p` libtraceevent takes as part of the conversion
/// (`parse_arg_format_pointer`).
fn pointer_suffix(f: &[u8]) -> usize {
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    match at(0) {
        b'F' | b'S' | b'f' | b's' => 1,
        b'M' | b'm' => 1 + usize::from(matches!(at(1), b'R' | b'F')),
        b'I' | b'i' => {
            let mut ret = 0;
            let mut index = 2;
            let kind = at(1);
            if kind == b'S' {
                while matches!(at(index), b'p' | b'f' | b's') {
                    ret += 1;
                    index += 1;
                }
            }
            if matches!(kind, b'S' | b'4') {
                if matches!(at(index), b'h' | b'n' | b'l' | b'b') {
                    ret += 1;
                    index += 1;
                }
                if kind == b'4' {
                    return ret + 2;
                }
            }
            if matches!(kind, b'S' | b'6') {
                ret += usize::from(at(index) == b'c') + 1;
            }
            ret + 1
        }
        b'U' => 1 + usize::from(matches!(at(1), b'L' | b'l' | b'B' | b'b')),
        b'h' => 1 + usize::from(matches!(at(1), b'C' | b'D' | b'N')),
        _ => 0,
    }
}

/// A width or precision written as digits (`%999999999d`) makes glibc print that many bytes.
fn check_static_width(spec: &[u8]) -> Result<(), String> {
    for run in spec.split(|b| !b.is_ascii_digit()) {
        let text = std::str::from_utf8(run).unwrap_or("");
        let too_big = !run.is_empty()
            && text
                .parse::<u64>()
                .map_or(true, |v| v > u64::from(MAX_PRINT_WIDTH));
        if too_big {
            return Err(format!(
                "conversion {:?} has a width above {MAX_PRINT_WIDTH}",
                String::from_utf8_lossy(spec)
            ));
        }
    }
    Ok(())
}

/// Whether a `printk_formats` string is safe as the format of a binary printk (`bprint`)
/// record: libtraceevent prints such records with it, taking every `*` width from the record and
/// written widths as they are. Refuses any `*` and widths above [`MAX_PRINT_WIDTH`].
pub(super) fn printk_format_is_safe(format: &str) -> bool {
    let f = format.as_bytes();
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'%' {
            i += 1;
            continue;
        }
        if f.get(i + 1) == Some(&b'%') {
            i += 2;
            continue;
        }
        let start = i;
        i += 1;
        while f.get(i).is_some_and(|c| {
            matches!(
                c,
                b'-' | b'#' | b'.' | b'*' | b'0'..=b'9' | b'l' | b'L' | b'h' | b'z' | b'Z'
            )
        }) {
            i += 1;
        }
        let spec = &f[start..i];
        if spec.contains(&b'*') || check_static_width(spec).is_err() {
            return false;
        }
    }
    true
}
