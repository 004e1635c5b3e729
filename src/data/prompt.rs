//! The caption grammar of the shapes data: its closed vocabulary, the structured `Prompt` a caption
//! stands for, printing a `Prompt` as a caption and parsing a caption back.
//!
//! ```text
//! prompt   := list | object relation object | count [size] [color] plural
//! list     := object | object "and" object | object "and" object "and" object
//! object   := "a" [size] [color] shape
//! relation := "above" | "below" | "on the left of" | "on the right of"
//! count    := "two" | "three"
//! size     := "small" | "large"
//! color    := "red" | "green" | "blue" | "yellow" | "purple" | "white"
//! shape    := "circle" | "square" | "triangle"        plural := shape + "s"
//! ```
//! Words are matched case-insensitively; a trailing period and commas are ignored. The generator always
//! names colors; leaving a color or size out is allowed for hand-written prompts and then matches any.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every word a caption may contain, in a fixed order: the word-level tokenizer of the text encoder
/// numbers words by their index here, so append new words at the end and never reorder.
#[rustfmt::skip]
pub const VOCABULARY: &[&str] = &[
    "a", "two", "three", "small", "large", "red", "green", "blue", "yellow", "purple", "white", "circle",
    "square", "triangle", "circles", "squares", "triangles", "and", "above", "below", "on", "the", "left",
    "right", "of",
];

/// The words of `VOCABULARY`, for tokenizers that want an owned list.
pub fn vocabulary() -> Vec<&'static str> {
    VOCABULARY.to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    White,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

/// Where the first object of a relation prompt stands with respect to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

/// The benchmark category of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// One object: color and shape.
    Single,
    /// Two or three objects of different colors and shapes, each color bound to its shape.
    Binding,
    /// Two objects and where one stands relative to the other.
    Relation,
    /// Two or three objects of one kind.
    Counting,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }
}

impl Color {
    pub const ALL: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::White];

    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::White => "white",
        }
    }
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

impl Relation {
    pub const ALL: [Relation; 4] = [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "on the left of",
            Relation::RightOf => "on the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
}

impl Category {
    pub const ALL: [Category; 4] = [Category::Single, Category::Binding, Category::Relation, Category::Counting];

    pub fn name(self) -> &'static str {
        match self {
            Category::Single => "single",
            Category::Binding => "binding",
            Category::Relation => "relation",
            Category::Counting => "counting",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One described object. `None` means the prompt does not say, and any value matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub shape: Shape,
    pub color: Option<Color>,
    pub size: Option<Size>,
}

impl ObjectSpec {
    pub fn new(shape: Shape, color: Option<Color>, size: Option<Size>) -> Self {
        ObjectSpec { shape, color, size }
    }

    /// "small red" / "red" / "" : the adjectives in caption order.
    fn adjectives(&self) -> String {
        let words: Vec<&str> = self.size.map(Size::word).into_iter().chain(self.color.map(Color::word)).collect();
        words.join(" ")
    }
}

/// What a caption asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// "a red circle", "a red circle and a blue square" (one to three objects).
    Objects(Vec<ObjectSpec>),
    /// "a red circle above a blue square": `subject` stands in `relation` to `object`.
    Relation { subject: ObjectSpec, relation: Relation, object: ObjectSpec },
    /// "two green circles": exactly `count` objects matching `spec`.
    Count { count: usize, spec: ObjectSpec },
}

impl Prompt {
    pub fn category(&self) -> Category {
        match self {
            Prompt::Objects(specs) if specs.len() <= 1 => Category::Single,
            Prompt::Objects(_) => Category::Binding,
            Prompt::Relation { .. } => Category::Relation,
            Prompt::Count { .. } => Category::Counting,
        }
    }

    /// The caption for this prompt, in the grammar `parse_prompt` reads.
    pub fn caption(&self) -> String {
        self.to_string()
    }
}

fn write_object(f: &mut fmt::Formatter<'_>, spec: &ObjectSpec) -> fmt::Result {
    let adjectives = spec.adjectives();
    if adjectives.is_empty() {
        write!(f, "a {}", spec.shape.word())
    } else {
        write!(f, "a {} {}", adjectives, spec.shape.word())
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prompt::Objects(specs) => {
                for (i, spec) in specs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    write_object(f, spec)?;
                }
                Ok(())
            }
            Prompt::Relation { subject, relation, object } => {
                write_object(f, subject)?;
                write!(f, " {} ", relation.words())?;
                write_object(f, object)
            }
            Prompt::Count { count, spec } => {
                let number = match count {
                    2 => "two",
                    3 => "three",
                    _ => return write!(f, "{} {}", count, spec.shape.plural()),
                };
                let adjectives = spec.adjectives();
                if adjectives.is_empty() {
                    write!(f, "{} {}", number, spec.shape.plural())
                } else {
                    write!(f, "{} {} {}", number, adjectives, spec.shape.plural())
                }
            }
        }
    }
}

/// Splits a caption into lowercase words, dropping commas and a final period. Both the parser and
/// the text encoder's tokenizer go through here so they agree on what a word is.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .map(|w| w.trim_end_matches('.').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The index in `VOCABULARY` of every word of `text`; a word outside it is a usage error.
pub fn token_ids(text: &str) -> Result<Vec<u32>> {
    words(text)
        .iter()
        .map(|w| VOCABULARY.iter().position(|v| v == w).map(|i| i as u32).ok_or_else(|| unknown_word(w)))
        .collect()
}

fn unknown_word(word: &str) -> Error {
    Error::usage(format!("unknown word `{word}` in a shapes prompt; the vocabulary is: {}", VOCABULARY.join(", ")))
}

fn grammar_error(text: &str, msg: &str) -> Error {
    Error::usage(format!(
        "cannot read shapes prompt `{text}`: {msg}. Prompts look like \"a red circle\", \
         \"a small blue square and a yellow triangle\", \"a red circle on the left of a green square\", \
         \"two white triangles\"; the vocabulary is: {}",
        VOCABULARY.join(", ")
    ))
}

/// A cursor over the words of a caption.
struct Words<'a> {
    text: &'a str,
    words: Vec<String>,
    at: usize,
}

impl Words<'_> {
    fn peek(&self) -> Option<&str> {
        self.words.get(self.at).map(String::as_str)
    }

    fn take_if(&mut self, word: &str) -> bool {
        if self.peek() == Some(word) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        if self.take_if(word) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("`{word}`")))
        }
    }

    fn unexpected(&self, wanted: &str) -> Error {
        match self.peek() {
            Some(w) => grammar_error(self.text, &format!("expected {wanted} but found `{w}`")),
            None => grammar_error(self.text, &format!("expected {wanted} but the prompt ended")),
        }
    }

    fn size(&mut self) -> Option<Size> {
        let size = Size::ALL.into_iter().find(|s| self.peek() == Some(s.word()))?;
        self.at += 1;
        Some(size)
    }

    fn color(&mut self) -> Option<Color> {
        let color = Color::ALL.into_iter().find(|c| self.peek() == Some(c.word()))?;
        self.at += 1;
        Some(color)
    }

    fn shape(&mut self, plural: bool) -> Result<Shape> {
        let found = Shape::ALL.into_iter().find(|s| self.peek() == Some(if plural { s.plural() } else { s.word() }));
        match found {
            Some(shape) => {
                self.at += 1;
                Ok(shape)
            }
            None if plural => Err(self.unexpected("a plural shape (circles, squares, triangles)")),
            None => Err(self.unexpected("a shape (circle, square, triangle)")),
        }
    }

    /// "a [size] [color] shape"
    fn object(&mut self) -> Result<ObjectSpec> {
        self.expect("a")?;
        let size = self.size();
        let color = self.color();
        let shape = self.shape(false)?;
        Ok(ObjectSpec { shape, color, size })
    }

    fn relation(&mut self) -> Result<Option<Relation>> {
        if self.take_if("above") {
            return Ok(Some(Relation::Above));
        }
        if self.take_if("below") {
            return Ok(Some(Relation::Below));
        }
        if !self.take_if("on") {
            return Ok(None);
        }
        self.expect("the")?;
        let relation = if self.take_if("left") {
            Relation::LeftOf
        } else if self.take_if("right") {
            Relation::RightOf
        } else {
            return Err(self.unexpected("`left` or `right`"));
        };
        self.expect("of")?;
        Ok(Some(relation))
    }
}

/// Parses a caption of the shapes grammar (see the module docs). Words outside `VOCABULARY` and
/// sentences outside the grammar are usage errors that list the vocabulary.
pub fn parse_prompt(text: &str) -> Result<Prompt> {
    let words = words(text);
    if let Some(bad) = words.iter().find(|w| !VOCABULARY.contains(&w.as_str())) {
        return Err(unknown_word(bad));
    }
    let mut cursor = Words { text, words, at: 0 };
    let prompt = match cursor.peek() {
        None => return Err(grammar_error(text, "the prompt is empty")),
        Some(number @ ("two" | "three")) => {
            let count = if number == "two" { 2 } else { 3 };
            cursor.at += 1;
            let size = cursor.size();
            let color = cursor.color();
            let shape = cursor.shape(true)?;
            Prompt::Count { count, spec: ObjectSpec { shape, color, size } }
        }
        Some(_) => {
            let first = cursor.object()?;
            if let Some(relation) = cursor.relation()? {
                let object = cursor.object()?;
                Prompt::Relation { subject: first, relation, object }
            } else {
                let mut specs = vec![first];
                while cursor.take_if("and") {
                    if specs.len() == 3 {
                        return Err(grammar_error(text, "at most three objects may be listed"));
                    }
                    specs.push(cursor.object()?);
                }
                Prompt::Objects(specs)
            }
        }
    };
    match cursor.peek() {
        None => Ok(prompt),
        Some(w) => Err(grammar_error(text, &format!("unexpected `{w}` after a complete prompt"))),
    }
}
