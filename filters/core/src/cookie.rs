//! `Cookie` request header: find one cookie, and rebuild the header without some, keeping every
//! other cookie byte for byte.

/// Split a `Cookie` header into `(name, value)` pairs, in order. Pairs without `=` are kept with
/// an empty value name-less pairs are skipped.
fn pairs(header: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    header.split(';').filter_map(|raw| {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        let (name, value) = trimmed.split_once('=').unwrap_or((trimmed, ""));
        Some((name.trim(), value.trim(), trimmed))
    })
}

/// The value of cookie `name` (the first one, as browsers send the most specific first).
pub fn get<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    pairs(header).find(|(n, _, _)| *n == name).map(|(_, v, _)| {
        // RFC 6265 allows a quoted value.
        v.strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v)
    })
}

/// The header without the cookies named in `names`; `None` when nothing is left.
pub fn without(header: &str, names: &[&str]) -> Option<String> {
    let kept: Vec<&str> = pairs(header)
        .filter(|(n, _, _)| !names.contains(n))
        .map(|(_, _, raw)| raw)
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_removes() {
        let h = "a=1; gh_jwt=tok.en.sig; b=\"x y\"; c";
        assert_eq!(get(h, "gh_jwt"), Some("tok.en.sig"));
        assert_eq!(get(h, "b"), Some("x y"));
        assert_eq!(get(h, "missing"), None);
        assert_eq!(
            without(h, &["gh_jwt"]).as_deref(),
            Some("a=1; b=\"x y\"; c")
        );
        assert_eq!(without("gh_jwt=x", &["gh_jwt"]), None);
    }
}
