//! Turns a byte span of the policy text into what an error message needs: the line, the rule
//! it falls in, and the key path inside it. Serde's errors from `toml` carry only a span and
//! checks after parsing only hold one, so both are placed the same way: by walking a spanned
//! parse of the document down to the innermost key that contains the span.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where in the file something is, as an error message shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The `[[rule]]` the span falls in, if any.
    pub rule: Option<RuleRef>,
    /// Dotted path (`to.cidr[0]`), relative to the rule when there is one; may be empty.
    pub key: String,
}

/// `12: rule[1] "name": key `to.cidr[0]``, the part of a message after the file name.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.line)?;
        if let Some(rule) = &self.rule {
            write!(f, ": {rule}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        Ok(())
    }
}

/// A rule as messages name it: its index among `[[rule]]` tables, and its name once known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub index: usize,
    pub name: Option<String>,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "rule[{}] {name:?}", self.index),
            None => write!(f, "rule[{}]", self.index),
        }
    }
}

pub(crate) struct Locator<'i> {
    text: &'i str,
    /// None when the text is not TOML; then only line and column are known.
    doc: Option<Spanned<DeTable<'i>>>,
    /// Byte offset of each line's start, so a line number costs a binary search, not a scan:
    /// a file of many rules asks for many.
    line_starts: Vec<usize>,
}

enum Step {
    Key(String),
    Index(usize),
}

impl<'i> Locator<'i> {
    pub fn new(text: &'i str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Locator { text, doc: DeTable::parse(text).ok(), line_starts }
    }

    /// 1-based line and character column of a byte offset (clamped to the text).
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|start| *start <= offset);
        let start = self.line_starts.get(line.wrapping_sub(1)).copied().unwrap_or(0);
        (line, self.text[start..offset].chars().count() + 1)
    }

    /// False when the text does not even parse as TOML.
    pub fn is_toml(&self) -> bool {
        self.doc.is_some()
    }

    pub fn locate(&self, span: Range<usize>) -> Location {
        let (line, column) = self.line_col(span.start);
        let mut path = Vec::new();
        // An empty span (end of input) lies in no key.
        if let (Some(doc), false) = (&self.doc, span.is_empty()) {
            search_table(doc.get_ref(), &span, &mut path);
        }
        let mut steps = path.as_slice();
        let mut rule = None;
        if let [Step::Key(k), Step::Index(i), rest @ ..] = steps {
            if k == "rule" {
                rule = Some(RuleRef { index: *i, name: self.rule_name(*i) });
                steps = rest;
            }
        }
        let mut key = String::new();
        for step in steps {
            match step {
                Step::Key(k) => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(k);
                }
                Step::Index(i) => key.push_str(&format!("[{i}]")),
            }
        }
        Location { line, column, rule, key }
    }

    fn rule_name(&self, index: usize) -> Option<String> {
        let rules = self.doc.as_ref()?.get_ref().get("rule")?;
        let DeValue::Array(rules) = rules.get_ref() else { return None };
        let DeValue::Table(rule) = rules.get(index)?.get_ref() else { return None };
        match rule.get("name")?.get_ref() {
            DeValue::String(s) if !s.trim().is_empty() => Some(s.to_string()),
            _ => None,
        }
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

// Containers are searched whether or not their own span covers the target: an array of
// tables is spanned by its first `[[header]]` only, and a table by its header.
fn search_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<Step>) -> bool {
    for (k, v) in table {
        path.push(Step::Key(k.get_ref().to_string()));
        // The key itself (unknown-field errors point there), else the innermost key below it,
        // else its whole value.
        if contains(&k.span(), span) || search_value(v.get_ref(), span, path) || contains(&v.span(), span) {
            return true;
        }
        path.pop();
    }
    false
}

fn search_value(value: &DeValue<'_>, span: &Range<usize>, path: &mut Vec<Step>) -> bool {
    match value {
        DeValue::Table(t) => search_table(t, span, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                if search_value(item.get_ref(), span, path) || contains(&item.span(), span) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[defaults]\nrequire_golden_binary = true\n\n[[rule]]\nname = \"a\"\n\n\
                       [[rule]]\nname = \"b\"\nto = { cidr = [\"10.0.0.0/8\", \"1.2.3.4\"] }\n";

    fn at(needle: &str) -> Location {
        let start = DOC.find(needle).unwrap();
        Locator::new(DOC).locate(start..start + needle.len())
    }

    #[test]
    fn finds_the_innermost_key() {
        assert_eq!(
            at("\"1.2.3.4\""),
            Location {
                line: 9,
                column: 30,
                rule: Some(RuleRef { index: 1, name: Some("b".into()) }),
                key: "to.cidr[1]".into()
            }
        );
        assert_eq!(at("true").key, "defaults.require_golden_binary");
        assert_eq!(at("true").rule, None);
        assert_eq!(at("to").key, "to");
        assert_eq!(at("\"a\"").rule, Some(RuleRef { index: 0, name: Some("a".into()) }));
    }

    #[test]
    fn line_and_column() {
        let l = Locator::new("ab\ncé\nx");
        assert_eq!(l.line_col(0), (1, 1));
        assert_eq!(l.line_col(2), (1, 3));
        assert_eq!(l.line_col(3), (2, 1));
        assert_eq!(l.line_col(7), (3, 1));
        assert_eq!(l.line_col(5), (2, 2), "inside a character");
        assert_eq!(Locator::new("ab").line_col(99), (1, 3));
        assert_eq!(Locator::new("").line_col(0), (1, 1));
    }
}
