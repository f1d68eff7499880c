//! Istio's own validation of the VirtualService fields a ChatRelease writes (`spec.traffic`),
//! checked before any write. Istio's validating webhook refuses a VirtualService that breaks these
//! rules, so without them the VirtualService write would fail in a real cluster, each reconcile,
//! after the Deployments were already written.
//!
//! The CRD's CEL rules (`crd.rs`) refuse the same at apply wherever CEL can say it, regex syntax
//! included (CEL's `matches()` compiles with Go's regexp, as Istio does). This checks them all
//! again, for objects admitted before a CRD upgrade and specs that reach the operator some other
//! way (`simulate` files), and adds what CEL cannot say: which canary matches are certain to match
//! every request. Each rule names the Istio function it mirrors (`istio.io/istio`,
//! `pkg/config/validation/validation.go` unless said otherwise).

use crate::crd::{HttpMatch, StringMatch, Traffic};
use crate::settings::SpecError;
use std::net::{IpAddr, Ipv6Addr};

/// Longest regex Istio takes, in bytes (`validateStringRegexp`: Envoy's RE2 program size limit,
/// approximated by the length).
pub const MAX_REGEX_BYTES: usize = 1024;
/// The gateway name that means the sidecars of the mesh.
pub const MESH_GATEWAY: &str = "mesh";
/// Header names starting so are JWT claims (`jwt.HeaderJWTClaim`).
pub const JWT_CLAIM_HEADER: &str = "@request.auth.claims";
/// Pseudo-headers a header match may name (`pseudoHeaders`).
pub const PSEUDO_HEADERS: [&str; 5] = [":method", ":scheme", ":authority", ":path", ":status"];

/// What a person is told when a canary match would take everyone.
const EVERYONE: &str = "all users would reach the canary";

/// Every rule of this module on `traffic`; the first broken one, naming its field below `spec`.
pub fn check(traffic: &Traffic) -> Result<(), SpecError> {
    let istio = &traffic.istio;
    // ValidateVirtualService: bound to gateways only when some are listed and mesh is not
    // (isGateway); otherwise the rules for the mesh apply.
    let gateways_only =
        !istio.gateways.is_empty() && !istio.gateways.iter().any(|g| g == MESH_GATEWAY);

    for (i, gateway) in istio.gateways.iter().enumerate() {
        if let Some(why) = gateway_problem(gateway) {
            return Err(error(
                format!("traffic.istio.gateways[{i}]"),
                format!(
                    "{gateway:?} is not a gateway Istio takes ({why}): write namespace/name (each \
                     a DNS label: letters, digits and '-', at most 63), a plain gateway name such \
                     as public, or mesh"
                ),
            ));
        }
    }

    for (i, host) in istio.hosts.iter().enumerate() {
        let field = format!("traffic.istio.hosts[{i}]");
        // ValidateVirtualService: an invalid domain is still fine when it is an IP address, and
        // only a valid domain meets the wildcard check.
        match agent::wildcard_domain_problem(host) {
            Some(why) if !is_ip_address(host) => {
                return Err(error(
                    field,
                    format!(
                        "{host:?} is not a host Istio takes ({why}): write a DNS name such as \
                         chat.example.com, a wildcard only at the start (\"*\" or \
                         \"*.example.com\"), or an IP address"
                    ),
                ));
            }
            Some(_) => {}
            None if host == "*" && !gateways_only => {
                return Err(error(
                    field,
                    "\"*\" (every host) is allowed only for a VirtualService bound to gateways, \
                     and Istio refuses it for the mesh: list traffic.istio.gateways (without \
                     mesh), or name the hosts",
                ));
            }
            None => {}
        }
    }
    // ValidateVirtualService: "duplicate hosts in virtual service", by host.Name.Matches.
    for (j, later) in istio.hosts.iter().enumerate() {
        if let Some(i) = istio.hosts[..j]
            .iter()
            .position(|earlier| hosts_overlap(earlier, later))
        {
            return Err(error(
                format!("traffic.istio.hosts[{j}]"),
                format!(
                    "{later:?} overlaps {:?} (traffic.istio.hosts[{i}]): Istio refuses a \
                     VirtualService whose hosts match each other",
                    istio.hosts[i]
                ),
            ));
        }
    }

    for (i, m) in traffic.canary_match.iter().enumerate() {
        check_match(&format!("traffic.canaryMatch[{i}]"), m, gateways_only)?;
    }
    Ok(())
}

fn error(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One canaryMatch entry: validateHTTPRouteMatchRequest's checks, then whether it takes everyone.
fn check_match(field: &str, m: &HttpMatch, gateways_only: bool) -> Result<(), SpecError> {
    for (name, value) in m.headers.iter().flatten() {
        let here = key_path(&format!("{field}.headers"), name);
        if let Some(why) = header_name_problem(name) {
            return Err(error(here, why));
        }
        // ValidateVirtualService: "JWT claim based routing (key: ...) is only supported for
        // gateway".
        if is_jwt_claim(name) && !gateways_only {
            return Err(error(
                here,
                "routes on a JWT claim, which Istio does only for a VirtualService bound to \
                 gateways: list traffic.istio.gateways (without mesh)",
            ));
        }
        check_string_match(&here, value, false)?;
    }
    if let Some(uri) = &m.uri {
        check_string_match(&format!("{field}.uri"), uri, true)?;
    }
    for (name, value) in m.query_params.iter().flatten() {
        let here = key_path(&format!("{field}.queryParams"), name);
        // Istio does not check query parameter names, but Envoy refuses an empty one
        // (QueryParameterMatcher.name has min_len 1), and with it the whole route table.
        if name.is_empty() {
            return Err(error(here, "a query parameter name must not be empty"));
        }
        check_string_match(&here, value, false)?;
    }
    if let Some(why) = matches_every_request(m) {
        return Err(error(
            field,
            format!("matches every request ({why}): {EVERYONE}"),
        ));
    }
    Ok(())
}

/// `map.key` for a readable key, `map["key"]` for one with other characters.
fn key_path(map: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@[]".contains(c));
    if plain {
        format!("{map}.{key}")
    } else {
        format!("{map}[{key:?}]")
    }
}

/// Istio's StringMatch is a oneof; validateStringMatch and validateStringMatchRegexp check it.
fn check_string_match(field: &str, m: &StringMatch, on_uri: bool) -> Result<(), SpecError> {
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        return Err(error(field, "needs exactly one of exact, prefix or regex"));
    }
    if m.prefix.as_deref() == Some("") {
        // validateStringMatch: "prefix string match should not be empty". Istio takes an empty
        // prefix on uri, where it matches every path.
        let why = if on_uri {
            format!("must not be empty: an empty uri prefix matches every request, and {EVERYONE}")
        } else {
            "must not be empty: Istio refuses an empty prefix".to_string()
        };
        return Err(error(format!("{field}.prefix"), why));
    }
    if let Some(regex) = &m.regex
        && let Some(why) = regex_problem(regex)
    {
        return Err(error(format!("{field}.regex"), why));
    }
    Ok(())
}

/// Why Istio would refuse `re`, if it would: validateStringMatchRegexp ("regex string match should
/// not be empty") and validateStringRegexp (at most 1024 bytes, compiles as RE2).
pub fn regex_problem(re: &str) -> Option<String> {
    if re.is_empty() {
        return Some("must not be empty: Istio refuses an empty regex".into());
    }
    if re.len() > MAX_REGEX_BYTES {
        return Some(format!(
            "is {} bytes long; Istio takes regexes of at most {MAX_REGEX_BYTES} bytes",
            re.len()
        ));
    }
    match compile(re, false) {
        // Well formed, only beyond the regex crate's size limit (a Unicode class repeated a
        // thousand times): RE2 takes it, and Istio only limits the length.
        Err(Compiled::TooBig) | Ok(_) => None,
        Err(Compiled::Invalid(why)) => Some(format!(
            "{re:?} is not an RE2 regex, the only kind Istio takes (no look-around, no \
             backreferences; https://github.com/google/re2/wiki/Syntax): {why}"
        )),
    }
}

/// Why [`compile`] gave no regex.
#[derive(Debug)]
enum Compiled {
    Invalid(String),
    TooBig,
}

/// `re` compiled by the regex crate. Its syntax is RE2's (Istio compiles with Go's regexp, Envoy
/// with RE2) but for what [`rust_syntax`] translates or refuses. `anchored`: the whole text must
/// match, as Envoy matches paths, headers and query parameters.
fn compile(re: &str, anchored: bool) -> Result<regex::Regex, Compiled> {
    let pattern = rust_syntax(re).map_err(Compiled::Invalid)?;
    let pattern = if anchored {
        format!("^(?:{pattern})$")
    } else {
        pattern
    };
    regex::RegexBuilder::new(&pattern)
        // RE2's `\012`; `\1` (a backreference) is refused before.
        .octal(true)
        .build()
        .map_err(|e| match e {
            // The text is a caret diagram of the pattern, then "error: <what>".
            regex::Error::Syntax(text) => Compiled::Invalid(
                text.lines()
                    .find_map(|line| line.strip_prefix("error: "))
                    .unwrap_or(text.trim())
                    .to_string(),
            ),
            regex::Error::CompiledTooBig(_) => Compiled::TooBig,
            other => Compiled::Invalid(other.to_string()),
        })
}

/// The largest count RE2 takes, and the largest product of nested counts (Go's repeatIsValid).
const MAX_COUNT: u64 = 1000;

/// RE2's syntax, as Go's regexp/syntax parses it, in the regex crate's; or what RE2 refuses and
/// the regex crate would take. Checked against Go on a corpus in the tests.
/// - `\Q...\E` quotes a literal in RE2 and is unknown to the regex crate: escaped.
/// - `\1`..`\7` not followed by an octal digit is a backreference: refused (the regex crate's
///   octal mode would read it as an octal escape).
/// - `\<`, `\>` are literals in RE2, word boundaries in the regex crate; `\p{^Greek}` is RE2's
///   `\P{Greek}`.
/// - a repetition right after a repetition (`a**`, possessive `a++`, `a{2}*`), a count above 1000
///   and nested counts whose product is above 1000 (`(a{100}){20}`) are refused by RE2.
/// - a repetition right after a flag group (`a(?i)*`) repeats what precedes the flags in RE2 and
///   is an error in the regex crate: checked, then left out.
/// - the flags u, x and R are the regex crate's only.
/// - a `{` that starts no count is a literal in RE2.
/// - a class is read item by item as RE2 reads it (`[`, `&`, `~` and `-` outside a range are
///   literals; the regex crate nests classes and has `&&`, `--`, `~~` operators), and each
///   literal written escaped.
fn rust_syntax(re: &str) -> Result<String, String> {
    Translator {
        chars: re.chars().collect(),
        i: 0,
        out: String::with_capacity(re.len() + 8),
    }
    .run()
}

struct Translator {
    chars: Vec<char>,
    /// The next character to read.
    i: usize,
    out: String,
}

impl Translator {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.i + ahead).copied()
    }

    fn run(mut self) -> Result<String, String> {
        // Per open group, the largest product of nested counts among its finished items.
        let mut groups: Vec<u64> = vec![0];
        // The last item, which a repetition applies to, with its product of nested counts.
        let mut operand: Option<u64> = None;
        let commit = |groups: &mut Vec<u64>, operand: &mut Option<u64>| {
            if let (Some(product), Some(group)) = (operand.take(), groups.last_mut()) {
                *group = (*group).max(product);
            }
        };
        let mut after_repeat = false;
        let mut after_flags = false;
        while let Some(c) = self.peek(0) {
            // Go applies a repetition right after `(?i)` to what came before the flags, which
            // the regex crate refuses: such a repetition is checked, then left out (a catch-all
            // check may miss it, never invent one).
            let keep = !after_flags;
            let (mut repeat, mut flags) = (false, false);
            match c {
                '\\' if self.peek(1) == Some('Q') => {
                    // Everything up to `\E` (or the end) is literal, backslashes included.
                    self.i += 2;
                    let mut literal = String::new();
                    while let Some(q) = self.peek(0) {
                        self.i += 1;
                        if q == '\\' && self.peek(0) == Some('E') {
                            self.i += 1;
                            break;
                        }
                        literal.push(q);
                    }
                    self.out.push_str(&regex::escape(&literal));
                    if !literal.is_empty() {
                        commit(&mut groups, &mut operand);
                        operand = Some(1);
                    }
                }
                '\\' => {
                    let text = self.escape()?;
                    self.out.push_str(&text);
                    commit(&mut groups, &mut operand);
                    operand = Some(1);
                }
                '[' => {
                    self.class()?;
                    commit(&mut groups, &mut operand);
                    operand = Some(1);
                }
                '(' if self.peek(1) == Some('?') => {
                    // Flags: RE2 has i, m, s and U; the regex crate also u, x and R.
                    let letters: Vec<char> = self.chars[self.i + 2..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphabetic() || **c == '-')
                        .copied()
                        .collect();
                    if let Some(flag) = letters.iter().find(|f| "uxR".contains(**f)) {
                        return Err(format!("flag {flag} is not RE2's (it has i, m, s and U)"));
                    }
                    let end = self.i + 2 + letters.len();
                    let through = if self.chars.get(end) == Some(&')') {
                        // Flags alone, such as (?i): no group, no item.
                        flags = true;
                        end
                    } else {
                        // The opener as a whole: (?:, (?i:, (?P<name> or (?<name>; the rest
                        // (look-around and the like) the regex crate refuses.
                        let name = match (self.peek(2), self.peek(3)) {
                            (Some('P'), Some('<')) => Some(self.i + 4),
                            (Some('<'), Some(c)) if c != '=' && c != '!' => Some(self.i + 3),
                            _ => None,
                        };
                        let close = match name {
                            Some(from) => self.chars[from..]
                                .iter()
                                .position(|c| *c == '>')
                                .map(|p| from + p),
                            None => (self.chars.get(end) == Some(&':')).then_some(end),
                        };
                        commit(&mut groups, &mut operand);
                        groups.push(0);
                        close.unwrap_or(self.i + 1)
                    };
                    // `(?)`, flags of none, is nothing in RE2 and an error in the regex crate.
                    if !(flags && letters.is_empty()) {
                        self.out.extend(&self.chars[self.i..=through]);
                    }
                    self.i = through + 1;
                }
                '(' => {
                    self.out.push('(');
                    self.i += 1;
                    commit(&mut groups, &mut operand);
                    groups.push(0);
                }
                ')' => {
                    self.out.push(')');
                    self.i += 1;
                    commit(&mut groups, &mut operand);
                    // An unopened ')' the regex crate refuses.
                    operand = Some(if groups.len() > 1 {
                        groups.pop().unwrap_or(0)
                    } else {
                        1
                    });
                }
                '|' => {
                    self.out.push('|');
                    self.i += 1;
                    commit(&mut groups, &mut operand);
                }
                '*' | '+' | '?' => {
                    self.i += 1;
                    self.repetition(&c.to_string(), keep, operand.is_some(), after_repeat)?;
                    repeat = true;
                }
                '{' => match count(&self.chars[self.i..]) {
                    Some((len, min, max)) => {
                        let text: String = self.chars[self.i..self.i + len].iter().collect();
                        self.i += len;
                        if min > MAX_COUNT || max.is_some_and(|m| m > MAX_COUNT || m < min) {
                            return Err(format!(
                                "invalid repeat count {text}: RE2 takes counts up to {MAX_COUNT}"
                            ));
                        }
                        self.repetition(&text, keep, operand.is_some(), after_repeat)?;
                        let most = max.unwrap_or(min);
                        let product = if most == 0 {
                            0
                        } else {
                            most.saturating_mul(operand.unwrap_or(1).max(1))
                        };
                        if (min >= 2 || max.is_some_and(|m| m >= 2)) && product > MAX_COUNT {
                            return Err(format!(
                                "invalid repeat count {text}: nested counts multiply to {product}, \
                                 and RE2 takes up to {MAX_COUNT}"
                            ));
                        }
                        operand = operand.map(|_| product);
                        repeat = true;
                    }
                    None => {
                        // A '{' that starts no count is a literal.
                        self.out.push_str("\\{");
                        self.i += 1;
                        commit(&mut groups, &mut operand);
                        operand = Some(1);
                    }
                },
                c => {
                    if c == '}' {
                        self.out.push('\\');
                    }
                    self.out.push(c);
                    self.i += 1;
                    commit(&mut groups, &mut operand);
                    operand = Some(1);
                }
            }
            // A repetition's `?` makes it lazy and is part of it.
            if repeat && self.peek(0) == Some('?') {
                self.i += 1;
                if keep {
                    self.out.push('?');
                }
            }
            after_repeat = repeat;
            after_flags = flags;
        }
        Ok(self.out)
    }

    /// A repetition operator `text` (already read): written out unless it follows flags.
    fn repetition(
        &mut self,
        text: &str,
        keep: bool,
        operand: bool,
        after_repeat: bool,
    ) -> Result<(), String> {
        if !keep && !operand {
            return Err(format!("missing argument to repetition operator {text}"));
        }
        if after_repeat {
            return Err(format!(
                "{text} right after a repetition: RE2 does not stack repetitions (no a** or \
                 possessive a++)"
            ));
        }
        if keep {
            self.out.push_str(text);
        }
        Ok(())
    }

    /// The escape at the backslash under `i`, in the regex crate's syntax.
    fn escape(&mut self) -> Result<String, String> {
        let start = self.i;
        let Some(next) = self.peek(1) else {
            // A trailing backslash: the regex crate says what is wrong.
            self.i += 1;
            return Ok("\\".into());
        };
        self.i += 2;
        if ('1'..='7').contains(&next) && !self.peek(0).is_some_and(|c| ('0'..='7').contains(&c)) {
            return Err(format!("\\{next} is a backreference"));
        }
        // \< and \> are literals in RE2.
        if next == '<' || next == '>' {
            return Ok(next.to_string());
        }
        if matches!(next, 'p' | 'P' | 'x') && self.peek(0) == Some('{') {
            // \p{Greek}, \x{263a}: the braces belong to the escape; \p{^Greek} is \P{Greek}.
            if let Some(close) = self.chars[self.i..].iter().position(|c| *c == '}') {
                let inside: String = self.chars[self.i + 1..self.i + close].iter().collect();
                self.i += close + 1;
                return Ok(match inside.strip_prefix('^') {
                    Some(name) if next != 'x' => {
                        format!("\\{}{{{name}}}", if next == 'p' { 'P' } else { 'p' })
                    }
                    _ => format!("\\{next}{{{inside}}}"),
                });
            }
        } else if matches!(next, 'p' | 'P') && self.peek(0).is_some() {
            // \pL: one letter.
            self.i += 1;
        }
        Ok(self.chars[start..self.i].iter().collect())
    }

    /// The class at the `[` under `i`, read as Go's parseClass does.
    fn class(&mut self) -> Result<(), String> {
        const POSIX: [&str; 14] = [
            "alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower", "print",
            "punct", "space", "upper", "word", "xdigit",
        ];
        self.out.push('[');
        self.i += 1;
        if self.peek(0) == Some('^') {
            self.out.push('^');
            self.i += 1;
        }
        let mut first = true;
        while let Some(c) = self.peek(0) {
            if c == ']' && !first {
                self.out.push(']');
                self.i += 1;
                return Ok(());
            }
            first = false;
            if c == '[' && self.peek(1) == Some(':') {
                // [:alpha:], up to the next ":]" wherever it is; none: '[' is a literal.
                let from = self.i + 2;
                let end = (from..self.chars.len().saturating_sub(1))
                    .find(|&j| self.chars[j] == ':' && self.chars[j + 1] == ']');
                if let Some(end) = end {
                    let name: String = self.chars[from..end].iter().collect();
                    if !POSIX.contains(&name.strip_prefix('^').unwrap_or(&name)) {
                        return Err(format!("[:{name}:] is not a character class"));
                    }
                    self.out.extend(&self.chars[self.i..end + 2]);
                    self.i = end + 2;
                    continue;
                }
            }
            // \d, \pL, \p{Greek}: classes, which cannot start a range.
            if c == '\\' && self.peek(1).is_some_and(|e| "dDsSwWpP".contains(e)) {
                let text = self.escape()?;
                self.out.push_str(&text);
                continue;
            }
            let low = self.class_char()?;
            self.out.push_str(&low);
            if self.peek(0) == Some('-') && self.peek(1).is_some_and(|c| c != ']') {
                self.i += 1;
                let high = self.class_char()?;
                self.out.push('-');
                self.out.push_str(&high);
            }
        }
        // No closing ']': the regex crate says so.
        Ok(())
    }

    /// One character of a class (under `i`), escaped when it is punctuation.
    fn class_char(&mut self) -> Result<String, String> {
        match self.peek(0) {
            Some('\\') => self.escape(),
            Some(c) => {
                self.i += 1;
                Ok(if c.is_ascii_punctuation() && c != '<' && c != '>' {
                    format!("\\{c}")
                } else {
                    c.to_string()
                })
            }
            None => Ok(String::new()),
        }
    }
}

/// A count at the start of `chars` as Go's parseRepeat reads it: `{n}`, `{n,}` or `{n,m}`, no
/// leading zeros. Its length, min and max (`None`: no limit).
fn count(chars: &[char]) -> Option<(usize, u64, Option<u64>)> {
    fn number(chars: &[char], at: usize) -> Option<(u64, usize)> {
        let digits = chars
            .get(at..)?
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 || (digits > 1 && chars[at] == '0') {
            return None;
        }
        let value = chars[at..at + digits].iter().fold(0u64, |n, c| {
            n.saturating_mul(10)
                .saturating_add(u64::from(*c as u8 - b'0'))
        });
        Some((value, at + digits))
    }
    let (min, mut at) = number(chars, 1)?;
    let max = match chars.get(at)? {
        '}' => Some(min),
        ',' if chars.get(at + 1) == Some(&'}') => {
            at += 1;
            None
        }
        ',' => {
            let (max, next) = number(chars, at + 1)?;
            at = next;
            Some(max)
        }
        _ => return None,
    };
    (chars.get(at) == Some(&'}')).then_some((at + 1, min, max))
}

/// Istio's ValidateHTTPHeaderNameOrJwtClaimRoute.
fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a header name must not be empty".into());
    }
    if is_jwt_claim(name) || PSEUDO_HEADERS.contains(&name) {
        return None;
    }
    // validHeaderNameRegex: RFC 7230's token characters. Istio writes them as the class
    // "[!#$%&'*+-.^_`|~A-Za-z0-9]", where "+-." is a range: ',' is in too.
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+,-.^_`|~".contains(c);
    if name.chars().all(token) {
        return None;
    }
    Some(format!(
        "{name:?} is not a header name Istio takes: an HTTP header name (letters, digits and \
         !#$%&'*+-.^_`|~), a pseudo-header ({}) or {JWT_CLAIM_HEADER}.<claim>",
        PSEUDO_HEADERS.join(", ")
    ))
}

/// Istio's jwt.ToRoutingClaim(name).Match: `@request.auth.claims.<claim>` or
/// `@request.auth.claims[<claim>]`, the prefix in any case.
pub fn is_jwt_claim(name: &str) -> bool {
    let Some(prefix) = name.get(..JWT_CLAIM_HEADER.len()) else {
        return false;
    };
    if !prefix.eq_ignore_ascii_case(JWT_CLAIM_HEADER) {
        return false;
    }
    let rest = &name[JWT_CLAIM_HEADER.len()..];
    (rest.starts_with('.') && rest.len() > 1)
        || (rest.starts_with('[') && rest.ends_with(']') && rest.len() > 2)
}

/// Istio's validateGatewayNames, for one name. (Istio stops at the first name without `/`; every
/// name is checked here.)
fn gateway_problem(name: &str) -> Option<String> {
    let Some((namespace, gateway)) = name.split_once('/') else {
        // A plain name, `mesh` or the legacy `name.namespace`: agent.ValidateFQDN.
        return agent::fqdn_problem(name);
    };
    if namespace.is_empty() || gateway.is_empty() {
        return Some("namespace and gateway name cannot be empty".into());
    }
    if !agent::is_dns1123_label(namespace) {
        return Some(format!("namespace {namespace:?} is not a DNS label"));
    }
    if !agent::is_dns1123_label(gateway) {
        return Some(format!("gateway name {gateway:?} is not a DNS label"));
    }
    None
}

/// Istio's netutil.IsValidIPAddress (Go's netip.ParseAddr): IPv4, or IPv6 with an optional zone.
fn is_ip_address(text: &str) -> bool {
    if text.parse::<IpAddr>().is_ok() {
        return true;
    }
    text.split_once('%')
        .is_some_and(|(address, zone)| !zone.is_empty() && address.parse::<Ipv6Addr>().is_ok())
}

/// Istio's host.Name.Matches: equal, or one is a wildcard (`*...`) whose rest ends the other.
fn hosts_overlap(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(a_rest), _) if b.ends_with(a_rest) => true,
        (_, Some(b_rest)) if a.ends_with(b_rest) => true,
        _ => a == b,
    }
}

/// Istio's `pkg/config/validation/agent` and `pkg/config/labels` checks on names.
mod agent {
    /// labels.IsDNS1123Label: `[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?`, at most 63.
    pub fn is_dns1123_label(label: &str) -> bool {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    }

    /// labels.IsWildcardDNS1123Label: `*`, or a DNS label behind an optional `*` or `*-`, at
    /// most 63 in all.
    fn is_wildcard_dns1123_label(label: &str) -> bool {
        if label.len() > 63 {
            return false;
        }
        if label == "*" {
            return true;
        }
        let rest = label
            .strip_prefix("*-")
            .or_else(|| label.strip_prefix('*'))
            .unwrap_or(label);
        is_dns1123_label(rest)
    }

    /// CheckDNS1123Preconditions.
    fn preconditions_problem(name: &str) -> Option<String> {
        if name.len() > 255 {
            return Some("longer than 255 characters".into());
        }
        if name.is_empty() {
            return Some("empty".into());
        }
        None
    }

    /// ValidateDNS1123Labels: dot-separated DNS labels, the last not a number; a trailing dot is
    /// allowed.
    fn labels_problem(domain: &str) -> Option<String> {
        let parts: Vec<&str> = domain.split('.').collect();
        let last = parts.len() - 1;
        // Go's strconv.Atoi: a sign is allowed, and a number too big for an int64 is not one.
        if parts[last].parse::<i64>().is_ok() {
            return Some(format!(
                "the top-level domain {:?} cannot be all digits",
                parts[last]
            ));
        }
        for (i, label) in parts.iter().enumerate() {
            if i == last && label.is_empty() {
                return None;
            }
            if !is_dns1123_label(label) {
                return Some(format!(
                    "label {label:?} is not a DNS label: letters, digits and '-', at most 63, \
                     no '-' at either end"
                ));
            }
        }
        None
    }

    /// ValidateFQDN.
    pub fn fqdn_problem(name: &str) -> Option<String> {
        preconditions_problem(name).or_else(|| labels_problem(name))
    }

    /// ValidateWildcardDomain: wildcards only in the first label.
    pub fn wildcard_domain_problem(domain: &str) -> Option<String> {
        if let Some(why) = preconditions_problem(domain) {
            return Some(why);
        }
        let (first, rest) = match domain.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (domain, None),
        };
        if !is_wildcard_dns1123_label(first) {
            return Some(format!(
                "label {first:?} is not a DNS label or a wildcard (*, *name or *-name)"
            ));
        }
        rest.and_then(labels_problem)
    }
}

// ---- Canary matches that take everyone ----

/// Request paths of every kind a chat app serves, from `/` to a long one. A uri (or `:path`)
/// condition that holds for all of them holds for every request: no real selection passes them
/// all. Envoy matches a uri without its query string.
const PATHS: [&str; 12] = [
    "/",
    "/index.html",
    "/chat",
    "/chat/",
    "/webapi/chat/openai",
    "/v1/chat/completions",
    "/_next/static/chunks/app-4f1c2b9e.js",
    "/favicon.ico",
    "//double//slash",
    "/A-Z_a-z.0-9~!$&'()*+,;=:@%20",
    "/api/very/long/path/with/many/segments/0123456789/abcdefghijklmnopqrstuvwxyz/ABCDEFGHIJKLMNOPQRSTUVWXYZ/end",
    "/x",
];
/// `:path` holds the query string too.
const PATHS_WITH_QUERY: [&str; 3] = ["/?q=1", "/chat?session=abc&lang=en", "/x?"];
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
const SCHEMES: [&str; 2] = ["http", "https"];
const AUTHORITIES: [&str; 6] = [
    "chat.example.com",
    "chat.example.com:443",
    "lobe-chat.chat.svc.cluster.local:80",
    "10.0.0.7:3210",
    "[::1]:8080",
    "localhost",
];

/// Values a header of every request has, for the pseudo-headers Envoy always sets (`:status` is
/// a response's). Any other header, a JWT claim or a query parameter must be present to match,
/// which not every request is.
fn always_present_values(header: &str) -> Option<Vec<&'static str>> {
    match header {
        ":path" => Some(PATHS.iter().chain(&PATHS_WITH_QUERY).copied().collect()),
        ":method" => Some(METHODS.to_vec()),
        ":scheme" => Some(SCHEMES.to_vec()),
        ":authority" => Some(AUTHORITIES.to_vec()),
        _ => None,
    }
}

/// Whether `m` holds for every one of `values`, as Envoy matches: exact is equality, prefix a
/// prefix, regex a match of the whole value. A match with no value (Istio makes it "present", and
/// a uri without one is Envoy's default prefix "/") holds for anything present.
fn holds_for_all(m: &StringMatch, values: &[&str]) -> bool {
    if let Some(exact) = &m.exact {
        return values.iter().all(|v| v == exact);
    }
    if let Some(prefix) = &m.prefix {
        return values.iter().all(|v| v.starts_with(prefix.as_str()));
    }
    if let Some(regex) = &m.regex {
        // A regex that does not compile is refused on its own; Istio would refuse it too.
        return compile(regex, true).is_ok_and(|re| values.iter().all(|v| re.is_match(v)));
    }
    true
}

fn describe(m: &StringMatch) -> String {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), _, _) => format!("exact {v:?}"),
        (_, Some(v), _) => format!("prefix {v:?}"),
        (_, _, Some(v)) => format!("regex {v:?}"),
        _ => "with no value".into(),
    }
}

/// Why `m` is certain to match every request, if it is: it has no condition, or each of its
/// conditions holds for every request (a uri prefix "/", a uri regex such as `.*`, a pseudo-header
/// every request has matched by such a value). A canary route with it would send all users to
/// the canary. Conditions that need a header, a claim or a query parameter to be present are
/// never certain, whatever their value.
pub fn matches_every_request(m: &HttpMatch) -> Option<String> {
    if m.query_params.as_ref().is_some_and(|q| !q.is_empty()) {
        return None;
    }
    let mut reasons = Vec::new();
    for (name, value) in m.headers.iter().flatten() {
        let values = always_present_values(name)?;
        if !holds_for_all(value, &values) {
            return None;
        }
        reasons.push(format!(
            "header {name} {} holds for every request",
            describe(value)
        ));
    }
    if let Some(uri) = &m.uri {
        if !holds_for_all(uri, &PATHS) {
            return None;
        }
        reasons.push(format!("uri {} holds for every path", describe(uri)));
    }
    if reasons.is_empty() {
        return Some("it has no condition: no header, no uri, no query parameter".into());
    }
    Some(reasons.join(", and "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ChatRelease;
    use crate::settings::Settings;
    use serde::Deserialize;
    use serde_json::{Value, json};

    fn traffic(value: Value) -> Traffic {
        serde_json::from_value(value).expect("a Traffic")
    }

    /// The field `check` names for `value`, and its problem.
    fn refused(value: Value) -> (String, String) {
        let err = check(&traffic(value.clone())).expect_err(&value.to_string());
        (err.field, err.problem)
    }

    fn assert_refused(value: Value, field: &str, needle: &str) {
        let (got, problem) = refused(value.clone());
        assert_eq!(got, field, "{value}: {problem}");
        assert!(
            problem.contains(needle),
            "{value}: {problem:?} lacks {needle:?}"
        );
    }

    fn assert_accepted(value: Value) {
        if let Err(e) = check(&traffic(value.clone())) {
            panic!("{value}: {e}");
        }
    }

    fn header(name: &str, m: Value) -> Value {
        json!({"canaryMatch": [{"headers": {name: m}}]})
    }

    // --- 1. regexes: RE2 only, at most 1024 bytes ---

    #[test]
    fn a_regex_that_does_not_compile_is_refused_in_headers_query_params_and_uri() {
        for bad in ["(", "[a-", "a{2,1}", "*", "x\\"] {
            assert_refused(
                header("x-user", json!({"regex": bad})),
                "traffic.canaryMatch[0].headers.x-user.regex",
                "is not an RE2 regex",
            );
            assert_refused(
                json!({"canaryMatch": [{"queryParams": {"beta": {"regex": bad}}}]}),
                "traffic.canaryMatch[0].queryParams.beta.regex",
                "is not an RE2 regex",
            );
            assert_refused(
                json!({"canaryMatch": [{"uri": {"regex": bad}}]}),
                "traffic.canaryMatch[0].uri.regex",
                "is not an RE2 regex",
            );
        }
    }

    #[test]
    fn pcre_only_regexes_are_refused() {
        for (pcre, why) in [
            ("(?=beta)b", "look-around"),
            ("(?!beta)b", "look-around"),
            ("(?<=a)b", "look-around"),
            ("(?<!a)b", "look-around"),
            ("(a)\\1", "backreference"),
            ("(?P<n>a)(?P=n)", ""),
            ("(?>atomic)", ""),
            ("a++", ""),
            ("\\Z", ""),
        ] {
            let (field, problem) = refused(header("x-user", json!({"regex": pcre})));
            assert_eq!(
                field, "traffic.canaryMatch[0].headers.x-user.regex",
                "{pcre}"
            );
            assert!(problem.contains("is not an RE2 regex"), "{pcre}: {problem}");
            assert!(problem.contains(why), "{pcre}: {problem}");
        }
    }

    #[test]
    fn re2_syntax_the_regex_crate_spells_otherwise_is_taken() {
        for re2 in [
            // \Q...\E quotes a literal in RE2, backslashes included.
            r"\Qa.b*c\E",
            r"^/v1/\Q(beta)\E/.*",
            r"\Q\1\E",
            r"\Qunterminated(",
            // Octal escapes of two or three digits, and \0.
            r"\012",
            r"\0",
            r"a\17b",
            r"(?i)^(.*;)?\s*canary=true(;.*)?$",
            r"[[:alpha:]]+\pL\p{Greek}",
            r"(?P<name>a)(?<other>b)",
            r"a{1000}",
            r"\x{263a}",
        ] {
            assert_eq!(regex_problem(re2), None, "{re2}");
        }
        assert!(regex_problem(r"\1").is_some());
        assert!(regex_problem(r"\7x").is_some());
    }

    /// Go's regexp.Compile (what Istio runs, and CEL's matches() in the API server) on each
    /// pattern, as printed by a Go program fed this list: the check agrees on every one.
    #[test]
    fn the_regex_check_agrees_with_gos_regexp() {
        let go_compiles: &[(&str, bool)] = &[
            ("(", false),
            ("[a-", false),
            ("a{2,1}", false),
            ("*", false),
            ("x\\", false),
            ("(?=beta)b", false),
            ("(?!beta)b", false),
            ("(?<=a)b", false),
            ("(?<!a)b", false),
            ("(a)\\1", false),
            ("(?P<n>a)(?P=n)", false),
            ("(?>atomic)", false),
            ("a++", false),
            ("a**", false),
            ("a*+", false),
            ("a?*", false),
            ("a*?+", false),
            ("a*??", false),
            ("a{2}*", false),
            ("a*{2}", false),
            ("a{2}{3}", false),
            ("(a*)*", true),
            ("a{1000}", true),
            ("a{1001}", false),
            ("a{0,1001}", false),
            ("a{01}", true),
            ("a{,5}", true),
            ("a{", true),
            ("a{x}", true),
            ("a}", true),
            ("{", true),
            ("x{2,}", true),
            ("\\Z", false),
            ("\\z", true),
            ("\\A", true),
            ("\\Qa.b*c\\E", true),
            ("^/v1/\\Q(beta)\\E/.*", true),
            ("\\Q\\1\\E", true),
            ("\\Qunterminated(", true),
            ("\\012", true),
            ("\\0", true),
            ("a\\17b", true),
            ("\\1", false),
            ("\\7x", false),
            ("\\8", false),
            ("\\9", false),
            ("(?i)^(.*;)?\\s*canary=true(;.*)?$", true),
            ("[[:alpha:]]+\\pL\\p{Greek}", true),
            ("(?P<name>a)(?<other>b)", true),
            ("\\x{263a}", true),
            ("\\x41", true),
            ("[[]", true),
            ("[a[bc]]", true),
            ("[a&&b]", true),
            ("[a~~b]", true),
            ("[]a]", true),
            ("[^]a]", true),
            ("[[:foo:]]", false),
            ("[[:alpha]", true),
            ("^*", true),
            ("$+", true),
            ("\\b*", true),
            ("(?i)", true),
            ("(?x)a b", false),
            ("(?U)a+", true),
            ("(?s).*", true),
            ("\\C", false),
            ("\\e", false),
            ("\\<", true),
            ("\\-", true),
            ("\\@", true),
            ("a|*", false),
            ("()", true),
            ("a|", true),
            ("\\pN", true),
            ("\\p{Letter}", true),
            ("\\p{Lu}", true),
            ("\\p{Han}", true),
            ("[\\d-z]", true),
            ("[a-\\d]", false),
            ("\\d{2,3}?", true),
            (".*", true),
            ("^(.*;)?\\s*canary=true(;.*)?$", true),
            ("[\\Q]\\E]", false),
            ("(?i:a)b", true),
            ("(?-i)a", true),
            ("(?#comment)", false),
            ("\\N{DIGIT ONE}", false),
            ("\\h", false),
            ("\\R", false),
            ("[[:^alpha:]]", true),
            ("x{2}{,3}", true),
            ("a{1,2}{", true),
            ("[[:alpha:]-z]", true),
            ("(?u)a", false),
            ("(?R)a", false),
            ("(?ix)a", false),
            ("(?i-x:a)", false),
            ("[\\w-]", true),
            ("[a-]", true),
            ("[-a]", true),
            ("\\pL-", true),
            ("[\\pL-z]", true),
            ("[\\p{Greek}-z]", true),
            ("a{2}?", true),
            ("a{2}??", false),
            ("[&&]", true),
            ("[a-z&&[^aeiou]]", true),
            ("[~]", true),
            ("[\\[]", true),
            ("[\\]]", true),
            ("[a\\-z]", true),
            ("x{1,1000}", true),
            ("x{1000,}", true),
            ("x{99999999999}", false),
            ("[[:^word:]]", true),
            ("[[:word:]-]", true),
            ("(?P<n>x)", true),
            ("(?<n>x)(?P<m>y)", true),
            ("(?'n'x)", false),
            ("\\b{start}", true),
            ("\\pZ+", true),
            ("[^\\n]*", true),
            ("\\x{110000}", false),
            ("\\x{}", false),
            ("(?P<xu>a)", true),
            ("(?Pxu)", false),
            ("[a-z--b]", true),
            ("[+--]", true),
            ("[--a]", true),
            ("(?i)(?m)(?s)(?U)x", true),
            ("[\\Q]", false),
            ("\\Q[\\E", true),
            ("a{2}{", true),
            ("\\{", true),
            ("[{}]", true),
            ("a{1}{2", true),
            ("(?:a{2})*", true),
            ("(?)", true),
            ("a(?)b", true),
            ("a(?i)*", true),
            ("(?i)?", false),
            ("a(?i)**", false),
            ("[\\pL-z]", true),
            ("[^]\\p{Greek}--\\ b[^]\\z", false),
            ("(a{100}){20}", false),
            ("(a{100}){10}", true),
            ("((a{1000}){0}){2}", true),
            ("(a{10}|b{200}){5}", true),
            ("(a{10}|b{200}){6}", false),
            ("(a*){1000}", true),
            ("\\w{0,1000}", true),
            ("[]--\\<[]", false),
            ("[^--[:word:]]", true),
            ("\\p{^Greek}", true),
            ("\\P{^Greek}", true),
            ("[[:word:]a\\<]a", true),
            ("[[:a]b:]", false),
            ("a\\<b\\>", true),
        ];
        let mut disagree = Vec::new();
        for (pattern, go) in go_compiles {
            let ours = regex_problem(pattern);
            if ours.is_none() != *go {
                disagree.push(format!("{pattern:?}: Go {go}, ours {ours:?}"));
            }
        }
        assert!(disagree.is_empty(), "{disagree:#?}");
    }

    #[test]
    fn a_regex_longer_than_1024_bytes_is_refused_even_under_1024_characters() {
        assert_eq!(regex_problem(&"a".repeat(1024)), None);
        for long in ["a".repeat(1025), "é".repeat(600)] {
            assert_refused(
                header("x-user", json!({"regex": long})),
                "traffic.canaryMatch[0].headers.x-user.regex",
                "at most 1024 bytes",
            );
        }
    }

    // --- 2. empty prefix and regex ---

    #[test]
    fn an_empty_prefix_or_regex_is_refused_everywhere() {
        for (kind, needle) in [
            ("prefix", "must not be empty"),
            ("regex", "must not be empty"),
        ] {
            assert_refused(
                header("x-user", json!({kind: ""})),
                &format!("traffic.canaryMatch[0].headers.x-user.{kind}"),
                needle,
            );
            assert_refused(
                json!({"canaryMatch": [{"queryParams": {"beta": {kind: ""}}}]}),
                &format!("traffic.canaryMatch[0].queryParams.beta.{kind}"),
                needle,
            );
            assert_refused(
                json!({"canaryMatch": [{"uri": {kind: ""}}]}),
                &format!("traffic.canaryMatch[0].uri.{kind}"),
                needle,
            );
        }
        let (_, problem) = refused(json!({"canaryMatch": [{"uri": {"prefix": ""}}]}));
        assert!(problem.contains(EVERYONE), "{problem}");
        // An empty exact is a value like any other: the header is present and empty.
        assert_accepted(header("x-user", json!({"exact": ""})));
    }

    #[test]
    fn a_string_match_needs_exactly_one_value() {
        assert_refused(
            header("x-user", json!({})),
            "traffic.canaryMatch[0].headers.x-user",
            "exactly one of exact, prefix or regex",
        );
        assert_refused(
            json!({"canaryMatch": [{"uri": {"exact": "/a", "prefix": "/b"}}]}),
            "traffic.canaryMatch[0].uri",
            "exactly one",
        );
    }

    // --- 3. header and query parameter names ---

    #[test]
    fn a_header_name_must_be_an_http_token_a_pseudo_header_or_a_jwt_claim() {
        for bad in [
            "x user", "x:user", "x/user", "", "é", "x\"y", ":Method", ":foo", "x(y)",
        ] {
            let (field, problem) = refused(header(bad, json!({"exact": "1"})));
            assert!(
                field.starts_with("traffic.canaryMatch[0].headers"),
                "{bad}: {field}"
            );
            assert!(problem.contains("header name"), "{bad}: {problem}");
        }
        assert_eq!(
            refused(header("x user", json!({"exact": "1"}))).0,
            "traffic.canaryMatch[0].headers[\"x user\"]"
        );
        for good in [
            "x-user",
            "X-User-Tier",
            "cookie",
            "a!#$%&'*+-.^_`|~z",
            // Istio's class "+-." is a range from '+' to '.': ',' is in.
            "a,b",
            ":method",
            ":scheme",
            ":authority",
            ":path",
            ":status",
        ] {
            assert_accepted(header(good, json!({"exact": "1"})));
        }
    }

    #[test]
    fn query_parameter_names_may_be_anything_but_empty() {
        assert_refused(
            json!({"canaryMatch": [{"queryParams": {"": {"exact": "1"}}}]}),
            "traffic.canaryMatch[0].queryParams[\"\"]",
            "must not be empty",
        );
        // Istio does not check their names.
        assert_accepted(json!({"canaryMatch": [{"queryParams": {"a b/c": {"exact": "1"}}}]}));
    }

    // --- 4. hosts and gateways ---

    #[test]
    fn the_wildcard_host_needs_gateways_without_mesh() {
        for istio in [
            json!({"hosts": ["*"]}),
            json!({"hosts": ["*"], "gateways": ["mesh"]}),
            json!({"hosts": ["*"], "gateways": ["istio-system/public", "mesh"]}),
        ] {
            assert_refused(
                json!({"istio": istio}),
                "traffic.istio.hosts[0]",
                "bound to gateways",
            );
        }
        assert_accepted(json!({"istio": {"hosts": ["*"], "gateways": ["istio-system/public"]}}));
        // "*.suffix" is fine for the mesh too.
        assert_accepted(json!({"istio": {"hosts": ["*.example.com"]}}));
    }

    #[test]
    fn every_host_must_pass_istios_domain_check() {
        for bad in [
            "a b",
            "",
            "foo.*.com",
            "**.example.com",
            "*x*.example.com",
            "chat.example.123",
            "-chat.example.com",
            "chat-.example.com",
            "chat..example.com",
            "chat_example.com",
            "https://chat.example.com",
            "chat.example.com/",
            "chat.example.com:443",
            "01.2.3.4",
            "1.2.3.4%eth0",
        ] {
            let hosts = json!({"istio": {"hosts": ["ok.example.com", bad]}});
            assert_refused(hosts, "traffic.istio.hosts[1]", "is not a host Istio takes");
        }
        let too_long = format!("{}.com", "a.".repeat(127));
        assert_refused(
            json!({"istio": {"hosts": [too_long]}}),
            "traffic.istio.hosts[0]",
            "longer than 255",
        );
        let label_64 = format!("{}.com", "a".repeat(64));
        assert_refused(
            json!({"istio": {"hosts": [label_64]}}),
            "traffic.istio.hosts[0]",
            "is not a DNS label",
        );
        for good in [
            "chat.example.com",
            "Chat.Example.com",
            "lobe-chat",
            "lobe-chat.chat.svc.cluster.local",
            "*.example.com",
            "*chat.example.com",
            "*-chat.example.com",
            "istio.io.",
            // Only a domain's last label must not be all digits; one label alone may be.
            "123",
            "10.0.0.1",
            "::1",
            "fe80::1%eth0",
            "::ffff:10.0.0.1",
        ] {
            assert_accepted(json!({"istio": {"hosts": [good]}}));
        }
    }

    #[test]
    fn hosts_must_not_match_each_other() {
        for hosts in [
            json!(["chat.example.com", "chat.example.com"]),
            json!(["*.example.com", "chat.example.com"]),
            json!(["chat.example.com", "*.example.com"]),
            json!(["*.com", "*.example.com"]),
            json!(["*", "chat.example.com"]),
        ] {
            assert_refused(
                json!({"istio": {"hosts": hosts, "gateways": ["istio-system/public"]}}),
                "traffic.istio.hosts[1]",
                "overlaps",
            );
        }
        assert_accepted(json!({"istio": {"hosts": ["chat.example.com", "api.example.com"]}}));
        assert_accepted(json!({"istio": {"hosts": ["*.example.com", "example.org"]}}));
    }

    #[test]
    fn gateway_names_are_namespace_slash_name_a_plain_name_or_mesh() {
        for bad in [
            "b/c/d",
            "a b",
            "istio-system/",
            "/public",
            "istio_system/public",
            "istio-system/public gw",
            "123",
            "",
            "-gw",
        ] {
            assert_refused(
                json!({"istio": {"gateways": ["mesh", bad]}}),
                "traffic.istio.gateways[1]",
                "is not a gateway Istio takes",
            );
        }
        for good in [
            "mesh",
            "istio-system/public",
            "public",
            "public-gateway.istio-system",
            "default/gw-1",
        ] {
            assert_accepted(json!({"istio": {"gateways": [good]}}));
        }
    }

    // --- 5. JWT claims only on gateways ---

    #[test]
    fn jwt_claim_routing_needs_gateways_without_mesh() {
        for claim in [
            "@request.auth.claims.group",
            "@request.auth.claims[group]",
            "@Request.Auth.Claims.group",
        ] {
            let m = json!([{"headers": {claim: {"exact": "beta"}}}]);
            for istio in [
                json!({}),
                json!({"gateways": ["istio-system/public", "mesh"]}),
            ] {
                let (field, problem) = refused(json!({"istio": istio, "canaryMatch": m}));
                assert!(
                    field.starts_with("traffic.canaryMatch[0].headers") && field.contains(claim),
                    "{claim}: {field}"
                );
                assert!(problem.contains("JWT claim"), "{problem}");
            }
            assert_accepted(
                json!({"istio": {"gateways": ["istio-system/public"]}, "canaryMatch": m}),
            );
        }
        assert_eq!(
            refused(header(
                "@request.auth.claims.group",
                json!({"exact": "beta"})
            ))
            .0,
            "traffic.canaryMatch[0].headers.@request.auth.claims.group"
        );
        // Not a claim: no claim after the prefix, so a header name, and '@' is not in one.
        for not_claim in [
            "@request.auth.claims",
            "@request.auth.claims.",
            "@request.auth.claims[]",
        ] {
            assert!(!is_jwt_claim(not_claim), "{not_claim}");
            let (_, problem) = refused(header(not_claim, json!({"exact": "1"})));
            assert!(problem.contains("is not a header name"), "{problem}");
        }
    }

    // --- 6. canary matches that take everyone ---

    #[test]
    fn a_canary_match_without_any_condition_is_refused() {
        for m in [
            json!({}),
            json!({"headers": {}}),
            json!({"queryParams": {}}),
            json!({"headers": {}, "queryParams": {}}),
        ] {
            assert_refused(
                json!({"canaryMatch": [{"headers": {"x-a": {"exact": "1"}}}, m]}),
                "traffic.canaryMatch[1]",
                "matches every request (it has no condition",
            );
        }
    }

    #[test]
    fn conditions_every_request_meets_are_refused() {
        for m in [
            json!({"uri": {"prefix": "/"}}),
            json!({"uri": {"regex": ".*"}}),
            json!({"uri": {"regex": "^.*$"}}),
            json!({"uri": {"regex": "/.*"}}),
            json!({"uri": {"regex": ".+"}}),
            json!({"uri": {"regex": "(?s).*"}}),
            json!({"uri": {"regex": "[^?]*"}}),
            json!({"uri": {"prefix": "/"}, "headers": {}}),
            json!({"headers": {":method": {"regex": "[A-Z]+"}}}),
            json!({"headers": {":scheme": {"prefix": "http"}}}),
            json!({"headers": {":path": {"prefix": "/"}}}),
            json!({"headers": {":authority": {"regex": ".*"}}}),
            json!({"headers": {":method": {"regex": ".*"}}, "uri": {"regex": ".*"}}),
        ] {
            let (field, problem) = refused(json!({"canaryMatch": [m.clone()]}));
            assert_eq!(field, "traffic.canaryMatch[0]", "{m}");
            assert!(
                problem.starts_with("matches every request ("),
                "{m}: {problem}"
            );
            assert!(problem.ends_with(EVERYONE), "{m}: {problem}");
        }
        let (_, problem) = refused(json!({"canaryMatch": [{"uri": {"prefix": "/"}}]}));
        assert_eq!(
            problem,
            "matches every request (uri prefix \"/\" holds for every path): all users would \
             reach the canary"
        );
    }

    #[test]
    fn conditions_some_request_fails_are_taken() {
        for m in [
            // A header, claim or query parameter must be present, whatever its value.
            json!({"headers": {"cookie": {"regex": ".*"}}}),
            json!({"headers": {"x-canary": {"prefix": "t"}}}),
            json!({"queryParams": {"beta": {"regex": ".*"}}}),
            json!({"uri": {"prefix": "/"}, "queryParams": {"beta": {"exact": "1"}}}),
            json!({"uri": {"prefix": "/"}, "headers": {"x-canary": {"exact": "true"}}}),
            json!({"uri": {"prefix": "/beta"}}),
            json!({"uri": {"regex": "/beta/.*"}}),
            json!({"uri": {"regex": "/.{0,20}"}}),
            // An empty exact uri matches no request: useless, but it takes nobody.
            json!({"uri": {"exact": ""}}),
            json!({"uri": {"exact": "/"}}),
            json!({"headers": {":method": {"exact": "POST"}}}),
            json!({"headers": {":scheme": {"exact": "https"}}}),
            json!({"headers": {":status": {"regex": ".*"}}}),
            json!({"headers": {":authority": {"exact": "chat.example.com"}}}),
            json!({"headers": {":path": {"prefix": "/"}, "x-canary": {"exact": "1"}}}),
        ] {
            assert_accepted(json!({"canaryMatch": [m]}));
        }
    }

    // --- what people copy: the examples, the demo and the README ---

    fn releases_in(path: &str) -> Vec<ChatRelease> {
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("YAML"))
            .filter(|doc| doc["kind"] == "ChatRelease")
            .map(|doc| serde_json::from_value(doc).expect("a ChatRelease"))
            .collect()
    }

    #[test]
    fn the_examples_and_the_demo_release_pass() {
        let mut with_matches = 0;
        for path in [
            "examples/lobe-chat.yaml",
            "examples/lobe-chat-with-backend.yaml",
            "tests/cluster/demo-release.yaml",
        ] {
            let releases = releases_in(path);
            assert!(!releases.is_empty(), "{path}");
            for release in releases {
                if let Err(e) = check(&release.spec.traffic) {
                    panic!("{path}: {e}");
                }
                Settings::from_spec(&release.spec).unwrap_or_else(|e| panic!("{path}: {e}"));
                with_matches += usize::from(!release.spec.traffic.canary_match.is_empty());
            }
        }
        assert!(with_matches >= 3, "the cookie tester is exercised");
    }

    #[test]
    fn the_readmes_traffic_passes() {
        // The LobeChat release, and the header match the README suggests for the backend.
        assert_accepted(json!({
            "istio": {"hosts": ["chat.example.com"], "gateways": ["istio-system/public"]},
            "canaryMatch": [{"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}}],
            "stickyCookie": "chat-version"
        }));
        assert_accepted(json!({"canaryMatch": [{"headers": {"x-canary": {"exact": "true"}}}]}));
        assert_accepted(json!({}));
    }

    #[test]
    fn settings_refuse_what_these_rules_refuse() {
        let mut spec: crate::crd::ChatReleaseSpec = serde_json::from_value(json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "lobehub/lobe-chat:v1"}]}},
            "traffic": {"canaryMatch": [{"headers": {}}]}
        }))
        .unwrap();
        let err = Settings::from_spec(&spec).unwrap_err();
        assert_eq!(err.field, "traffic.canaryMatch[0]");
        assert!(
            err.to_string()
                .starts_with("spec.traffic.canaryMatch[0]: matches every request"),
            "{err}"
        );
        spec.traffic.canary_match.clear();
        assert!(Settings::from_spec(&spec).is_ok());
    }
}
