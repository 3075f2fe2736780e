//! Chat templates in Hugging Face's Jinja dialect, rendered exactly.

use tandem::model::chat_template::ChatTemplate;
use tandem::model::{ChatMessage, Tokenizer};

/// Llama 3 Instruct's template (also the presets' template).
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// In the style of DeepSeek-R1's template: a namespace collecting the system prompt, role tokens,
/// reasoning stripped from earlier assistant turns with `split`, and a `<think>` generation prompt.
const R1_STYLE: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}\
{% set ns = namespace(system_prompt='') %}\
{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}\
{{ bos_token }}{{ ns.system_prompt }}\
{%- for message in messages %}\
{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}\
{%- if message['role'] == 'assistant' and message['content'] is not none %}\
{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}\
{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}\
{%- endif %}\
{%- endfor -%}\
{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}";

fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
    list.iter().map(|(r, c)| ChatMessage::new(r, c)).collect()
}

#[test]
fn llama3_template_renders_exactly() {
    let t = ChatTemplate::new(LLAMA3).unwrap();
    let m = msgs(&[
        ("system", "Be brief. "),
        ("user", "\nHi there\n"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
    ]);
    let out = t
        .render(&m, true, "<|begin_of_text|>", "<|eot_id|>")
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let no_prompt = t.render(&m[..1], false, "<|begin_of_text|>", "").unwrap();
    assert_eq!(
        no_prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    );
}

#[test]
fn r1_style_template_renders_exactly() {
    let t = ChatTemplate::new(R1_STYLE).unwrap();
    let m = msgs(&[
        ("system", "You are helpful."),
        ("user", "2+2?"),
        ("assistant", "<think>\nadd\n</think>\n\n4"),
        ("user", "and 3+3?"),
    ]);
    let out = t
        .render(&m, true, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
        .unwrap();
    assert_eq!(
        out,
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>\
<｜User｜>and 3+3?<｜Assistant｜><think>\n"
    );
}

#[test]
fn hf_dialect_extras() {
    let render = |src: &str| {
        ChatTemplate::new(src)
            .unwrap()
            .render(&msgs(&[("user", "  Hi  ")]), false, "<s>", "</s>")
    };
    // Python string methods via pycompat, trim_blocks/lstrip_blocks.
    assert_eq!(
        render("{{ messages[0].content.strip() }}|{{ 'a,b'.split(',') | join('+') }}").unwrap(),
        "Hi|a+b"
    );
    assert_eq!(
        render("  {% if true %}\nx\n  {% endif %}\ny").unwrap(),
        "x\ny"
    );
    // Filters and tests real templates use.
    assert_eq!(
        render("{{ messages | selectattr('role', 'equalto', 'user') | list | length }}").unwrap(),
        "1"
    );
    assert_eq!(
        render("{{ messages[0].content is string }}{{ messages[0].get('name', 'anon') }}").unwrap(),
        "Trueanon" // as Python prints it
    );
    assert_eq!(
        render("{% for k, v in {'a': 1} | items %}{{ k }}={{ v }}{% endfor %}").unwrap(),
        "a=1"
    );
    // tojson with Python's json.dumps spacing, and with indent.
    assert_eq!(
        render(r#"{{ {"a": 1, "b": [true, none, "q\"é"]} | tojson }}"#).unwrap(),
        r#"{"a": 1, "b": [true, null, "q\"é"]}"#
    );
    assert_eq!(
        render(r#"{{ {"a": [1, 2]} | tojson(indent=2) }}"#).unwrap(),
        "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
    );
    assert_eq!(
        render("{{ messages | tojson }}").unwrap(),
        r#"[{"role": "user", "content": "  Hi  "}]"#
    );
    // strftime_now and raise_exception.
    let year = chrono::Local::now().format("%Y").to_string();
    assert_eq!(render("{{ strftime_now('%Y') }}").unwrap(), year);
    let err = render("{{ raise_exception('Conversation roles must alternate') }}").unwrap_err();
    assert!(
        format!("{err:#}").contains("Conversation roles must alternate"),
        "{err:#}"
    );
    assert!(ChatTemplate::new("{% if %}").is_err());
}

/// A tokenizer directory with an AddedToken-object bos and a list-form chat template.
#[test]
fn tokenizer_reads_template_list_and_added_token_objects() {
    let dir = tempfile::tempdir().unwrap();
    let preset = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llama");
    std::fs::copy(
        format!("{preset}/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false},
        "eos_token": "<|eot_id|>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": LLAMA3},
        ],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    // No generation_config.json nor config.json: eos comes from tokenizer_config's eos_token.
    assert_eq!(tok.eos_token_ids(), vec![516]);
    let text = tok
        .apply_chat_template(&msgs(&[("user", "w3 w4")]), true)
        .unwrap();
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        vec![512, 514, 0, 515, 3, 4, 516, 514, 0, 515]
    );
    // Without tokenizer.json there is no tokenizer.
    let empty = tempfile::tempdir().unwrap();
    assert!(Tokenizer::from_dir(empty.path()).unwrap().is_none());
    // A broken template is reported when the tokenizer loads.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for %}"}"#,
    )
    .unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("chat template"), "{err}");
}
