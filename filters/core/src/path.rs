//! Request-path hygiene, checked before any rule or scope template looks at the path.
//!
//! Rules (`match.prefix`) and scope templates compare the raw `:path`. A path that walks with
//! dot-segments (`/public/../api/x`, `%2e%2e`, `..%2f`) or hides a separator (`%2F`, `%5C`, a raw
//! `\`) could match one rule here and reach another resource upstream, so every filter that
//! matches on the path refuses such a path (400 / close 4400) before it matches anything.
//! Envoy's connection-manager options `normalize_path: true` and `merge_slashes: true` clean
//! most of these before the filters run; this check holds when they are missing.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `.` or `..` segment, plain or percent-encoded.
    DotSegment,
    /// An encoded `/` or `\`, or a raw `\`.
    HiddenSeparator,
}

impl PathError {
    /// The stat suffix: `denied.<reason>`.
    pub fn reason(self) -> &'static str {
        match self {
            PathError::DotSegment => "path_dot_segment",
            PathError::HiddenSeparator => "path_separator",
        }
    }
}

/// One percent-encoded byte at the start of `s` (`%2e` → `.`), if `s` starts with one.
fn encoded_byte(s: &[u8]) -> Option<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    match s {
        [b'%', h, l, ..] => Some((hex(*h)? * 16 + hex(*l)?) as u8),
        _ => None,
    }
}

/// Is `segment` `.` or `..` once decoded (`%2e`, `.%2E`, …)?
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut dots = 0;
    let mut rest = segment;
    while !rest.is_empty() {
        match (rest.first(), encoded_byte(rest)) {
            (Some(b'.'), _) => {
                dots += 1;
                rest = rest.get(1..).unwrap_or_default();
            }
            (_, Some(b'.')) => {
                dots += 1;
                rest = rest.get(3..).unwrap_or_default();
            }
            _ => return false,
        }
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// Check the path part of `:path` (the query string and fragment are not looked at).
pub fn check(path: &str) -> Result<(), PathError> {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let only = path.get(..end).unwrap_or(path).as_bytes();
    if only.contains(&b'\\') {
        return Err(PathError::HiddenSeparator);
    }
    let mut i = 0;
    while let Some(rest) = only.get(i..) {
        if rest.is_empty() {
            break;
        }
        if matches!(encoded_byte(rest), Some(b'/' | b'\\')) {
            return Err(PathError::HiddenSeparator);
        }
        i += 1;
    }
    if only.split(|&b| b == b'/').any(is_dot_segment) {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass() {
        for p in [
            "/",
            "/api/echo",
            "/ws/echo?room=a/../b",
            "/a.b/c..d/...",
            "/file.js",
            "/%41pi",
            "/x%2",
            "",
            "*",
        ] {
            assert_eq!(check(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_refused_plain_or_encoded() {
        for p in [
            "/public/../api/x",
            "/tenants/t1/../t2/calls",
            "/./api",
            "/api/..",
            "/api/.",
            "/%2e%2e/api",
            "/%2E./api",
            "/.%2e/api",
            "/a/%2e/b",
            "/a/..?q",
        ] {
            assert_eq!(check(p), Err(PathError::DotSegment), "{p}");
        }
    }

    #[test]
    fn hidden_separators_are_refused() {
        for p in [
            "/..%2fapi",
            "/a%2Fb",
            "/a%5cb",
            "/a%5C..",
            "/a\\..\\api",
            "/a\\b",
        ] {
            assert_eq!(check(p), Err(PathError::HiddenSeparator), "{p}");
        }
    }
}
