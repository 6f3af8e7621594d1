//! Incremental detokenization for streaming: text is released only once it forms whole
//! UTF-8 characters. Each step decodes a short window (the previous piece plus the new ids),
//! not the whole sequence, so a long generation stays linear.

use super::TextTokenizer;
use crate::error::Result;

/// Turns generated ids into text pieces as they come.
#[derive(Debug)]
pub struct TextStream<'a> {
    tok: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'a> TextStream<'a> {
    pub(super) fn new(tok: &'a TextTokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one id; returns the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.take(false)
    }

    fn take(&mut self, force: bool) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        let complete = force || !now.ends_with('\u{FFFD}');
        if complete && now.len() > before.len() && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// Whatever is left at the end (an incomplete character is emitted as is).
    pub fn finish(&mut self) -> Result<Option<String>> {
        self.take(true)
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
