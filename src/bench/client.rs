//! The HTTP load target: streaming OpenAI chat or completions requests, SSE parsed by hand.

use super::prompts::Prompt;
use super::target::{Chunk, ChunkStream, LoadTarget};
use anyhow::{anyhow, bail, Context, Result};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointType {
    Chat,
    Completions,
}

impl EndpointType {
    pub fn path(self) -> &'static str {
        match self {
            EndpointType::Chat => "v1/chat/completions",
            EndpointType::Completions => "v1/completions",
        }
    }
    /// The name genai-perf puts in run directory names.
    pub fn artifact_name(self) -> &'static str {
        match self {
            EndpointType::Chat => "chat",
            EndpointType::Completions => "completions",
        }
    }
}

pub struct HttpTarget {
    client: reqwest::Client,
    url: String,
    model: String,
    endpoint: EndpointType,
}

/// `localhost:8000` (genai-perf's style) or `http://host:port`, with or without a trailing `/`.
pub fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

impl HttpTarget {
    pub fn new(
        url: &str,
        model: &str,
        endpoint: EndpointType,
        request_timeout: Duration,
    ) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(request_timeout)
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()?;
        let url = format!("{}/{}", base_url(url), endpoint.path());
        Ok(Self {
            client,
            url,
            model: model.to_string(),
            endpoint,
        })
    }

    /// The request body: exactly `osl` tokens (`max_tokens = min_tokens`, EOS ignored, also in
    /// Dynamo's `nvext`), streamed, with usage in the last chunk.
    pub fn body(&self, prompt: &Prompt, osl: usize) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": self.model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": osl,
            "min_tokens": osl,
            "ignore_eos": true,
            "nvext": {"ignore_eos": true},
        });
        match self.endpoint {
            EndpointType::Chat => {
                body["messages"] = serde_json::json!([{"role": "user", "content": prompt.text}]);
            }
            EndpointType::Completions if !prompt.token_ids.is_empty() => {
                body["prompt"] = serde_json::json!(prompt.token_ids);
            }
            EndpointType::Completions => body["prompt"] = serde_json::json!(prompt.text),
        }
        body
    }
}

impl LoadTarget for HttpTarget {
    fn stream(&self, prompt: &Prompt, osl: usize) -> BoxFuture<'static, Result<ChunkStream>> {
        let request = self.client.post(&self.url).json(&self.body(prompt, osl));
        let url = self.url.clone();
        Box::pin(async move {
            let response = request
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!(
                    "POST {url}: HTTP {status}: {}",
                    text.chars().take(500).collect::<String>()
                );
            }
            Ok(sse_chunks(response.bytes_stream()).boxed())
        })
    }
}

#[derive(Deserialize)]
struct SseChunk {
    #[serde(default)]
    choices: Vec<SseChoice>,
    usage: Option<SseUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct SseChoice {
    delta: Option<SseDelta>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct SseDelta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct SseUsage {
    completion_tokens: Option<usize>,
}

/// Parses one `data:` payload; `None` for `[DONE]`.
pub fn parse_event(data: &str) -> Result<Option<Chunk>> {
    if data == "[DONE]" {
        return Ok(None);
    }
    let parsed: SseChunk =
        serde_json::from_str(data).with_context(|| format!("bad SSE payload: {data}"))?;
    if let Some(e) = parsed.error {
        bail!("server error in stream: {e}");
    }
    let mut chunk = Chunk {
        completion_tokens: parsed.usage.and_then(|u| u.completion_tokens),
        ..Default::default()
    };
    for choice in parsed.choices {
        if let Some(t) = choice.delta.and_then(|d| d.content).or(choice.text) {
            chunk.text.push_str(&t);
        }
    }
    Ok(Some(chunk))
}

/// Splits a byte stream into SSE events and yields their chunks until `[DONE]` or the end.
fn sse_chunks<S, B, E>(bytes: S) -> impl futures::Stream<Item = Result<Chunk>> + Send + 'static
where
    S: futures::Stream<Item = Result<B, E>> + Send + Unpin + 'static,
    B: AsRef<[u8]> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    async_stream::try_stream! {
        let mut bytes = bytes;
        let mut buf: Vec<u8> = Vec::new();
        'outer: while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|e| anyhow!("reading the stream: {e}"))?;
            buf.extend_from_slice(piece.as_ref());
            while let Some((end, sep)) = event_end(&buf) {
                let event = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + sep);
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data:") else { continue };
                    match parse_event(data.trim())? {
                        Some(chunk) => yield chunk,
                        None => break 'outer,
                    }
                }
            }
        }
    }
}

/// Position and length of the first event separator (`\n\n` or `\r\n\r\n`).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_completions_usage_done_and_errors() {
        let chat = parse_event(r#"{"choices":[{"delta":{"content":" hi"}}]}"#)
            .unwrap()
            .unwrap();
        assert_eq!((chat.text.as_str(), chat.has_output()), (" hi", true));
        let role = parse_event(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#);
        assert!(!role.unwrap().unwrap().has_output());
        let text = parse_event(r#"{"choices":[{"text":"x"}]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(text.text, "x");
        let usage = parse_event(r#"{"choices":[],"usage":{"completion_tokens":7}}"#).unwrap();
        assert_eq!(usage.unwrap().completion_tokens, Some(7));
        assert_eq!(parse_event("[DONE]").unwrap(), None);
        let err = parse_event(r#"{"error":{"message":"boom"}}"#).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert!(parse_event("{not json").is_err());
    }

    #[tokio::test]
    async fn events_split_across_reads_and_crlf_separators() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n: comment\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"after done\"}}]}\n\n";
        // Cut the body into 7-byte reads so events straddle them.
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            body.as_bytes().chunks(7).map(|c| Ok(c.to_vec())).collect();
        let chunks: Vec<Chunk> = sse_chunks(futures::stream::iter(pieces))
            .map(|c| c.unwrap())
            .collect()
            .await;
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, vec!["a", "b"]);
    }
}
