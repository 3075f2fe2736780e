//! Helpers shared by the bench test files.
#![allow(dead_code)]

use std::path::Path;

/// Writes a word-level tokenizer (`w0` .. `w999`, whitespace-split) to `dir/tokenizer.json`,
/// the kind Tandem's synthetic presets use: the mock server's ` w<N>` words are one token each.
pub fn write_word_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for i in 0..1000u32 {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("[UNK]".into(), 1000.into());
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

/// A port that was free a moment ago (and the next one, for pairs).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}
