//! Text from others made safe to show: control characters written as visible escapes.
//!
//! Plugins write most of what people read (metadata, log lines, call answers, error
//! messages, stderr tails). Shown raw, a control character could clear the screen, move the
//! cursor, retitle the window or forge a line. Every human-readable output of `toructl` and
//! of `torud plugin check` goes through [`escape`] (or [`escape_text`] for multi-line text);
//! JSON output does not need it (JSON escapes control characters itself). The daemon's own
//! log uses `Debug` formatting for the same purpose. Knows nothing of where the text is from.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character (C0 including TAB, CR and LF; DEL; C1, U+0080 to
/// U+009F) written as a visible escape: `\e` for ESC, `\t`, `\r`, `\n`, `\0`, and `\x07`
/// or `\u{9b}` for the others. Backslashes are left as they are, so escaping twice changes
/// nothing more.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_except(text, &[])
}

/// Like [`escape`], but keeps line breaks and tabs: for multi-line text (a call's body, a
/// KV value).
pub fn escape_text(text: &str) -> Cow<'_, str> {
    escape_except(text, &['\n', '\t'])
}

fn escape_except<'a>(text: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| c.is_control() && !keep.contains(&c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            '\x1b' => out.push_str("\\e"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        let hostile = "a\x1b[2J\x1b]0;x\x07\r\n\t\0\u{9b}\u{7f}é\\";
        assert_eq!(
            escape(hostile),
            "a\\e[2J\\e]0;x\\x07\\r\\n\\t\\0\\u{9b}\\x7fé\\"
        );
        assert_eq!(escape(&escape(hostile)), escape(hostile));
        assert_eq!(escape_text("a\n\tb\x1b\r"), "a\n\tb\\e\\r");
        assert!(matches!(escape("plain"), Cow::Borrowed("plain")));
    }
}
