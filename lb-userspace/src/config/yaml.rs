//! A YAML document as a tree whose every node knows its line and column, so
//! that every configuration error can name `FILE:LINE:COL`.
//!
//! serde-based YAML deserialisers stop at the first error and forget where a
//! value came from once it parsed; yaml-rust2's marked event stream keeps the
//! position of every node, which is what `xdplb check` needs to report all
//! errors at once.

use std::collections::HashSet;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// Line and column, both 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Self { line: m.line(), col: m.col() + 1 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(String),
    Seq(Vec<Node>),
    /// Keys in document order, with their own positions.
    Map(Vec<(String, Pos, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Scalar(_) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

enum Frame {
    Seq(Pos, Vec<Node>),
    /// The keys seen, besides the entries: a mapping of 100,000 keys must not
    /// cost 100,000 comparisons per key.
    Map(Pos, Vec<(String, Pos, Node)>, Option<(String, Pos)>, HashSet<String>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    error: Option<(Pos, String)>,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending, keys)) => match pending.take() {
                None => match node.value {
                    Value::Scalar(key) => *pending = Some((key, node.pos)),
                    _ => self.error = Some((node.pos, "mapping keys must be plain scalars".into())),
                },
                Some((key, key_pos)) => {
                    if !keys.insert(key.clone()) && self.error.is_none() {
                        self.error = Some((key_pos, format!("duplicate key `{key}`")));
                    }
                    entries.push((key, key_pos, node));
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(s, ..) => self.push_node(Node { value: Value::Scalar(s), pos }),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(pos, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Frame::Map(pos, Vec::new(), None, HashSet::new())),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(pos, items)) => Node { value: Value::Seq(items), pos },
                    // A block mapping's start mark is at its first `:`; its first key is where it begins.
                    Some(Frame::Map(pos, entries, _, _)) => {
                        let pos = entries.first().map_or(pos, |(_, key_pos, _)| *key_pos);
                        Node { value: Value::Map(entries), pos }
                    }
                    None => return,
                };
                self.push_node(node);
            }
            Event::Alias(_) if self.error.is_none() => {
                self.error = Some((pos, "YAML aliases are not supported in xdplb configuration".into()));
            }
            _ => {}
        }
    }
}

/// How deep mappings and lists may nest: a configuration needs 5 levels; a
/// hostile file of 25,000 nested lists must be an error, not a stack overflow.
pub const MAX_DEPTH: usize = 64;
/// How large a configuration file may be (1,000 VIPs × 100 backends is about 6 MiB).
pub const MAX_BYTES: usize = 32 << 20;

/// Parses one YAML document. An empty document is an empty mapping. More
/// than one document, nesting deeper than MAX_DEPTH or a text larger than
/// MAX_BYTES is an error at the position where it happens.
pub fn parse(text: &str) -> Result<Node, (Pos, String)> {
    if text.len() > MAX_BYTES {
        return Err((Pos { line: 1, col: 1 }, format!("the file is larger than {} MiB", MAX_BYTES >> 20)));
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    let mut documents = 0;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| (Pos::from(*e.marker()), e.info().to_string()))?;
        match event {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err((
                        Pos::from(mark),
                        "a second YAML document (after `---`): xdplb reads exactly one; \
                         remove the `---` line or split the file"
                            .into(),
                    ));
                }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if builder.stack.len() >= MAX_DEPTH => {
                return Err((Pos::from(mark), format!("nested more than {MAX_DEPTH} levels deep")));
            }
            _ => {}
        }
        builder.on_event(event, mark);
        if let Some(err) = builder.error.take() {
            return Err(err);
        }
    }
    Ok(builder.root.unwrap_or(Node { value: Value::Map(Vec::new()), pos: Pos { line: 1, col: 1 } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_values() {
        let doc = parse("a: 1\nlist:\n  - x: yes\n    y: no\n").unwrap();
        let Value::Map(entries) = &doc.value else { panic!() };
        assert_eq!(entries[0].1, Pos { line: 1, col: 1 });
        let Value::Seq(items) = &entries[1].2.value else { panic!() };
        let Value::Map(item) = &items[0].value else { panic!() };
        assert_eq!((item[1].0.as_str(), item[1].1), ("y", Pos { line: 4, col: 5 }));
        assert_eq!(item[1].2.pos, Pos { line: 4, col: 8 });
    }

    #[test]
    fn hostile_shapes_are_positioned_errors() {
        let deep = "- ".repeat(25_000) + "x\n";
        let (pos, msg) = parse(&deep).unwrap_err();
        assert_eq!((pos.line, msg.as_str()), (1, "nested more than 64 levels deep"));
        let flow = format!("a: {}{}", "[".repeat(25_000), "]".repeat(25_000));
        assert!(parse(&flow).is_err());
        let (pos, msg) = parse("vips: []\n---\nvips: []\n").unwrap_err();
        assert_eq!(pos.line, 2, "{msg}");
        assert!(msg.starts_with("a second YAML document"), "{msg}");
        assert!(parse("---\nvips: []\n...\n").is_ok(), "one explicit document is fine");
        let big = "#".repeat(MAX_BYTES + 1);
        assert_eq!(parse(&big).unwrap_err().1, "the file is larger than 32 MiB");
    }

    #[test]
    fn syntax_errors_and_duplicates_have_positions() {
        let (pos, msg) = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(pos.line >= 1 && !msg.is_empty());
        let (pos, msg) = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!((pos.line, msg.as_str()), (2, "duplicate key `a`"));
    }
}
