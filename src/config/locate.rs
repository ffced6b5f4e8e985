//! Finds where a key sits in a YAML file, for error messages.
//!
//! serde gives us values without positions, so checks that look at several keys at once
//! (is this node in `peers`? is this path absolute for this backend?) ask this index for the
//! line and column of the key they complain about. Paths are written like serde_path_to_error
//! writes them: `origin.node`, `replicas[1].path`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line and column (both 1-based) of every key and sequence item in one YAML document, and
/// of the second occurrence of a key written twice in one mapping.
#[derive(Debug, Default)]
pub struct KeyIndex {
    positions: HashMap<String, (usize, usize)>,
    duplicates: HashMap<String, (usize, usize)>,
}

impl KeyIndex {
    /// Indexes `text`. A document that does not parse yields an empty index: the caller
    /// reports the parse error from serde instead.
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return KeyIndex::default();
        }
        KeyIndex { positions: builder.positions, duplicates: builder.duplicates }
    }

    /// Whether nothing was indexed (also when the text is not valid YAML).
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Where `path` is written a second time in its mapping, if it is (serde only says
    /// "duplicate field", placed at the start of the document).
    pub fn duplicate(&self, path: &str) -> Option<(usize, usize)> {
        self.duplicates.get(path).copied()
    }

    /// Position of `path`, or of its nearest indexed ancestor (a missing key is reported
    /// where its parent mapping starts).
    pub fn position(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(pos) = self.positions.get(path) {
                return Some(*pos);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

/// One open container while walking the event stream.
enum Frame {
    /// A mapping; `key` is the key whose value comes next, if a key was just read.
    Map { path: String, key: Option<String> },
    /// A sequence; `next` is the index of the next item.
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
    duplicates: HashMap<String, (usize, usize)>,
}

impl Builder {
    /// The path of the value that the next event opens or is, and marks a key as consumed.
    fn next_value_path(&mut self, mark: Marker) -> Option<String> {
        let path = match self.stack.last_mut()? {
            Frame::Map { path, key } => {
                let key = key.take()?;
                join(path, &key)
            }
            Frame::Seq { path, next } => {
                let item = format!("{path}[{next}]");
                *next += 1;
                self.positions.entry(item.clone()).or_insert(line_col(mark));
                item
            }
        };
        Some(path)
    }
}

/// yaml-rust2 counts lines from 1 and columns from 0; we print both from 1, like serde_yaml.
fn line_col(mark: Marker) -> (usize, usize) {
    (mark.line(), mark.col() + 1)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                // A scalar in a mapping with no pending key is itself a key.
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    if key.is_none() {
                        let full = join(path, &value);
                        match self.positions.entry(full) {
                            Entry::Occupied(seen) => {
                                self.duplicates.entry(seen.key().clone()).or_insert(line_col(mark));
                            }
                            Entry::Vacant(new) => {
                                new.insert(line_col(mark));
                            }
                        }
                        *key = Some(value);
                        return;
                    }
                }
                self.next_value_path(mark);
            }
            Event::Alias(_) => {
                self.next_value_path(mark);
            }
            Event::MappingStart(..) => {
                let path = if self.stack.is_empty() { String::new() } else { self.next_value_path(mark).unwrap_or_default() };
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.next_value_path(mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text = "fileset: a\norigin:\n  node: alpha\nreplicas:\n  - node: beta\n    path: /x\n  - {node: gamma, path: /y}\n";
        let idx = KeyIndex::new(text);
        assert_eq!(idx.position("fileset").map(|p| p.0), Some(1));
        assert_eq!(idx.position("origin.node").map(|p| p.0), Some(3));
        assert_eq!(idx.position("replicas[0].path").map(|p| p.0), Some(6));
        assert_eq!(idx.position("replicas[1].node").map(|p| p.0), Some(7));
        // A missing key falls back to its parent.
        assert_eq!(idx.position("origin.snapshot_dir").map(|p| p.0), Some(2));
        assert_eq!(idx.position("nothing"), None);
    }

    #[test]
    fn a_key_written_twice_is_found_where_it_repeats() {
        let idx = KeyIndex::new("mode: a\norigin:\n  node: x\n  node: y\nmode: b\n");
        assert_eq!(idx.duplicate("mode"), Some((5, 1)));
        assert_eq!(idx.duplicate("origin.node"), Some((4, 3)));
        assert_eq!(idx.position("mode"), Some((1, 1)), "the first stays the key's position");
        assert_eq!(idx.duplicate("origin"), None);
    }

    #[test]
    fn columns_are_one_based() {
        let idx = KeyIndex::new("a:\n  b: 1\n");
        assert_eq!(idx.position("a"), Some((1, 1)));
        assert_eq!(idx.position("a.b"), Some((2, 3)));
    }
}
