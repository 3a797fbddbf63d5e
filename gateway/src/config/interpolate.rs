//! `${VAR}` and `${VAR:-default}` environment interpolation in configuration
//! strings.
//!
//! Interpolation runs on every string value of the parsed TOML document
//! (never on keys or on the raw text), so a variable can never break the TOML
//! syntax and every error can name the key it happened in. `$${` writes a
//! literal `${`.

/// Why a string could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${` without the closing `}`.
    #[error("unterminated `${{` (expected `${{NAME}}` or `${{NAME:-default}}`)")]
    Unterminated,
    /// `${}` or a name with characters other than letters, digits and `_`.
    #[error("invalid variable name `{0}` (use letters, digits and `_`)")]
    BadName(String),
    /// The variable is not set and no default was given.
    #[error("environment variable `{0}` is not set and has no default (write `${{{0}:-default}}`)")]
    Unset(String),
}

/// Replaces `${VAR}` and `${VAR:-default}` in `input`, looking variables up
/// with `lookup`. With `:-`, the default also applies when the variable is
/// set but empty (as in POSIX shells).
pub fn interpolate(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or(InterpolateError::Unterminated)?;
            let expr = &tail[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(InterpolateError::BadName(name.to_owned()));
            }
            match (lookup(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(InterpolateError::Unset(name.to_owned())),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("broker.local".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        assert_eq!(
            interpolate("mqtt://${HOST}:1883", &env),
            Ok("mqtt://broker.local:1883".into())
        );
        assert_eq!(interpolate("${PORT:-1883}", &env), Ok("1883".into()));
        assert_eq!(interpolate("${HOST:-x}", &env), Ok("broker.local".into()));
        assert_eq!(
            interpolate("${EMPTY:-fallback}", &env),
            Ok("fallback".into())
        );
        assert_eq!(interpolate("${EMPTY}", &env), Ok(String::new()));
        assert_eq!(
            interpolate("${A:-127.0.0.1:1883}", &env),
            Ok("127.0.0.1:1883".into())
        );
    }

    #[test]
    fn leaves_other_dollars_alone_and_escapes() {
        assert_eq!(
            interpolate("$edgefn/deadletter", &env),
            Ok("$edgefn/deadletter".into())
        );
        assert_eq!(interpolate("cost: 5$", &env), Ok("cost: 5$".into()));
        assert_eq!(interpolate("$${HOST}", &env), Ok("${HOST}".into()));
    }

    #[test]
    fn reports_errors() {
        assert_eq!(
            interpolate("${MISSING}", &env),
            Err(InterpolateError::Unset("MISSING".into()))
        );
        assert_eq!(
            interpolate("${HOST", &env),
            Err(InterpolateError::Unterminated)
        );
        assert_eq!(
            interpolate("${}", &env),
            Err(InterpolateError::BadName(String::new()))
        );
        assert_eq!(
            interpolate("${A B}", &env),
            Err(InterpolateError::BadName("A B".into()))
        );
    }
}
