//! What goes to stdout: plain lines for people and `cut`, or one JSON object per line with
//! `--json`. Notes for people (progress, hints, events other than messages) go to stderr.

use std::fmt::Display;
use std::io::Write as _;

use serde_json::Value;

/// The output mode of this run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    /// Prints `text` (plain mode) or `json` (JSON mode) as one line on stdout.
    pub(crate) fn print(&self, text: impl Display, json: Value) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{json}")?;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()
    }

    /// Prints a JSON object in JSON mode; nothing in plain mode.
    pub(crate) fn json(&self, json: Value) -> std::io::Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{json}")?;
            out.flush()?;
        }
        Ok(())
    }

    /// A note for people, on stderr (in both modes: stdout stays machine-readable).
    pub(crate) fn note(&self, text: impl Display) {
        eprintln!("{text}");
    }
}

/// Message text on one line: backslash, newline, carriage return and tab are written as
/// `\\`, `\n`, `\r` and `\t`, other control characters as `\u{..}`.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_kept_on_one_line() {
        assert_eq!(one_line("hi bob"), "hi bob");
        assert_eq!(one_line("a\tb\nc\\d\r"), "a\\tb\\nc\\\\d\\r");
        assert_eq!(one_line("\u{7}ü"), "\\u{7}ü");
    }
}
