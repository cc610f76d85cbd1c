//! Tokenizer built from the real GGUF: round trips (unicode, emoji, whitespace runs, numbers,
//! ChatML), digit splitting, special-token parsing on/off, decoding with special tokens
//! skipped, and the chat template rendered from the GGUF metadata.

use flag_llm::gguf::GgufFile;
use flag_llm::tokenizer::{ChatMessage, LlmTokenizer};

fn tokenizer() -> LlmTokenizer {
    let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    LlmTokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

const TEXTS: &[&str] = &[
    "Hello world",
    "Café naïve façade — Zürich, 東京, Москва, ñandú, Ελλάδα",
    "📈 Stocks up 🚀🚀 today 👍🏽 family: 👨\u{200d}👩\u{200d}👧 ok",
    "a  b   c\t\td\n\n\ne    \n  f  \r\n  end   ",
    "   leading and trailing   ",
    "Price 1234.56 rose 7% to $98,765 on 2024-03-15; 0.001 vs 1e-5 and  42  apples",
    "I'm sure it's fine, they'll've DON'T won't",
    "fn main() {\n    println!(\"{:?}\", x);\n}\n",
    "<|im_start|>user\nBuy or sell?<|im_end|>\n<|im_start|>assistant\n",
    "\u{0}\u{1f}\u{7f} control \u{feff} bom",
];

#[test]
fn round_trips_with_and_without_special_parsing() {
    let tok = tokenizer();
    for text in TEXTS {
        for parse_special in [true, false] {
            let ids = tok.encode(text, parse_special).unwrap();
            assert!(!ids.is_empty(), "{text:?}");
            let back = tok.decode(&ids, false).unwrap();
            assert_eq!(&back, text, "parse_special={parse_special}, ids {ids:?}");
        }
    }
    assert!(tok.encode("", true).unwrap().is_empty());
}

#[test]
fn known_ids_no_bos_and_digits_split_one_by_one() {
    let tok = tokenizer();
    assert!(!tok.add_bos());
    assert_eq!(tok.encode_prompt("Hello world").unwrap(), vec![19556, 905]);
    // Every digit is its own token, whatever precedes it ('0'..'9' are ids 32..41).
    let ids = tok.encode("x  12345  y\t\t7\n\n8 9", true).unwrap();
    assert_eq!(
        ids,
        vec![
            104, 256, 33, 34, 35, 36, 37, 216, 329, 1656, 39, 1116, 40, 216, 41
        ]
    );
    let ids = tok.encode("year 2024", true).unwrap();
    let digits: Vec<&str> = ids[ids.len() - 4..]
        .iter()
        .map(|&i| tok.token(i).unwrap())
        .collect();
    assert_eq!(digits, ["2", "0", "2", "4"]);
}

#[test]
fn special_tokens_parsed_only_when_asked() {
    let tok = tokenizer();
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.eos_id(), Some(2));
    let text = "<|im_start|>user\nhi<|im_end|>";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    let plain = tok.encode(text, false).unwrap();
    assert!(!plain.contains(&1) && !plain.contains(&2), "{plain:?}");
    assert!(plain.len() > ids.len());
    // Skipping special tokens on decode drops exactly the control tokens.
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(
        tok.encode("before<|endoftext|>mid", true).unwrap(),
        vec![17985, 0, 13687]
    );
    // Out-of-vocabulary ids are an error, not a panic.
    assert!(tok.decode(&[49152], false).is_err());
}

#[test]
fn chat_template_from_gguf_metadata() {
    let tok = tokenizer();
    let with_default_system = tok
        .apply_chat_template(&[ChatMessage::user("Buy or sell AAPL?")], true)
        .unwrap();
    assert_eq!(
        with_default_system,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nBuy or sell AAPL?<|im_end|>\n<|im_start|>assistant\n"
    );
    let msgs = [
        ChatMessage::system("You are a trader."),
        ChatMessage::user("Hi"),
        ChatMessage::new("assistant", "Hello."),
    ];
    let text = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a trader.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n"
    );
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 3);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}
