//! Bounded text: what a guest hands the host (errors, log lines, panic
//! messages) is cut to a size before it reaches a log or a dead letter.

use std::borrow::Cow;

/// `s` cut to at most `max` bytes (on a character boundary) plus
/// `… (N bytes cut)`.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes cut)", &s[..end], s.len() - end))
}

/// Cuts an owned string in place (see [`bounded`]).
pub fn bound(s: &mut String, max: usize) {
    if let Cow::Owned(cut) = bounded(s, max) {
        *s = cut;
    }
}

/// `error` and its sources, joined by `: ` (a client library's top-level
/// message alone, such as "builder error", does not say what is wrong).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}
