//! Synthetic prompts of an exact number of tokens for the target model's tokenizer.
//!
//! A prompt is a seeded sequence of words that each encode to one token (alone and after a space),
//! joined by spaces; the count is verified with the tokenizer and words are added or removed until
//! it matches. For a word-level tokenizer (`w123 w456 ...`) this is exact at once; for BPE
//! tokenizers the check-and-adjust loop makes it exact.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::Path;

/// The tokenizer prompts are counted with (a `tokenizer.json`).
pub struct BenchTokenizer {
    inner: tokenizers::Tokenizer,
}

impl BenchTokenizer {
    /// `path` is a model directory holding `tokenizer.json`, or the file itself.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", file.display()))?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self.encode(text)?.len())
    }

    /// Words that are one token alone and one token after a space, so that joining them
    /// with spaces gives one token per word.
    fn single_token_words(&self, limit: usize) -> Result<Vec<String>> {
        let vocab = self.inner.get_vocab_size(true) as u32;
        let mut words = Vec::new();
        for id in 0..vocab {
            let Ok(piece) = self.inner.decode(&[id], true) else {
                continue;
            };
            let word = piece.trim();
            let plain =
                (2..=10).contains(&word.len()) && word.chars().all(|c| c.is_ascii_alphanumeric());
            if !plain || words.iter().any(|w| w == word) {
                continue;
            }
            if self.count(word)? == 1 && self.count(&format!("{word} {word}"))? == 2 {
                words.push(word.to_string());
                if words.len() >= limit {
                    break;
                }
            }
        }
        if words.len() < 2 {
            bail!("the tokenizer has too few plain single-token words to build synthetic prompts");
        }
        Ok(words)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    /// The prompt's token ids (empty without a tokenizer).
    pub token_ids: Vec<u32>,
    /// Input sequence length as counted by the tokenizer (the requested one without a tokenizer).
    pub input_tokens: usize,
}

/// Prompt lengths: mean and standard deviation in tokens (genai-perf's synthetic input tokens).
#[derive(Debug, Clone, Copy)]
pub struct PromptShape {
    pub isl_mean: usize,
    pub isl_stddev: f64,
}

pub struct PromptGenerator<'a> {
    tokenizer: Option<&'a BenchTokenizer>,
    words: Vec<String>,
    rng: ChaCha8Rng,
    shape: PromptShape,
}

impl<'a> PromptGenerator<'a> {
    pub fn new(
        tokenizer: Option<&'a BenchTokenizer>,
        shape: PromptShape,
        seed: u64,
    ) -> Result<Self> {
        if shape.isl_mean == 0 {
            bail!("--isl must be at least 1");
        }
        let words = match tokenizer {
            Some(t) => t.single_token_words(4096)?,
            // Without a tokenizer: the word-level convention `w<N>` (exact for Tandem's synthetic
            // tokenizers, approximate elsewhere).
            None => (0..1000).map(|i| format!("w{i}")).collect(),
        };
        Ok(Self {
            tokenizer,
            words,
            rng: ChaCha8Rng::seed_from_u64(seed),
            shape,
        })
    }

    fn next_len(&mut self) -> usize {
        if self.shape.isl_stddev <= 0.0 {
            return self.shape.isl_mean;
        }
        let normal = Normal::new(self.shape.isl_mean as f64, self.shape.isl_stddev)
            .expect("stddev is finite and positive");
        normal.sample(&mut self.rng).round().max(1.0) as usize
    }

    fn push_words(&mut self, words: &mut Vec<usize>, n: usize) {
        for _ in 0..n {
            words.push(self.rng.random_range(0..self.words.len()));
        }
    }

    fn join(&self, words: &[usize]) -> String {
        let parts: Vec<&str> = words.iter().map(|&i| self.words[i].as_str()).collect();
        parts.join(" ")
    }

    /// One prompt of the next sampled length.
    pub fn next_prompt(&mut self) -> Result<Prompt> {
        let target = self.next_len();
        let mut words = Vec::with_capacity(target);
        self.push_words(&mut words, target);
        let Some(tok) = self.tokenizer else {
            return Ok(Prompt {
                text: self.join(&words),
                token_ids: vec![],
                input_tokens: target,
            });
        };
        for _ in 0..64 {
            let text = self.join(&words);
            let ids = tok.encode(&text)?;
            match ids.len().cmp(&target) {
                std::cmp::Ordering::Equal => {
                    return Ok(Prompt {
                        text,
                        token_ids: ids,
                        input_tokens: target,
                    })
                }
                std::cmp::Ordering::Greater => {
                    let excess = (ids.len() - target).min(words.len() - 1).max(1);
                    words.truncate(words.len() - excess);
                }
                std::cmp::Ordering::Less => {
                    let missing = target - ids.len();
                    self.push_words(&mut words, missing);
                }
            }
        }
        bail!("could not build a prompt of exactly {target} tokens with this tokenizer")
    }

    /// `n` prompts (distinct with overwhelming probability: each is a seeded random word sequence).
    pub fn prompts(&mut self, n: usize) -> Result<Vec<Prompt>> {
        (0..n)
            .map(|_| self.next_prompt())
            .collect::<Result<_>>()
            .context("generating prompts")
    }
}

/// The tokenizer to count with: `--tokenizer` when given, else the model's own when `model` is a
/// local directory or a preset under `$TANDEM_MODELS_DIR` or `models/`, else none.
pub fn resolve_tokenizer(explicit: Option<&Path>, model: &str) -> Result<Option<BenchTokenizer>> {
    if let Some(path) = explicit {
        return BenchTokenizer::load(path).map(Some);
    }
    let mut candidates = vec![std::path::PathBuf::from(model)];
    if let Some(dir) = std::env::var_os("TANDEM_MODELS_DIR") {
        candidates.push(Path::new(&dir).join(model));
    }
    candidates.push(Path::new("models").join(model));
    match candidates
        .iter()
        .find(|d| d.join("tokenizer.json").is_file())
    {
        Some(dir) => BenchTokenizer::load(dir).map(Some),
        None => Ok(None),
    }
}
