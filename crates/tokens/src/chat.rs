//! The built-in chat template.
//!
//! A chat request is rendered to text before tokenization, so the router must render exactly as
//! the engine does to reproduce its block hashes. The template is deliberately simple and
//! documented (README, "Tokenization"):
//!
//! ```text
//! <|role|>\n{content}\n        for every message, in order
//! <|assistant|>\n               once at the end (the generation prompt)
//! ```
//!
//! Each message's text depends only on that message, so a conversation that grows turn by turn
//! renders to a growing text prefix, which is what gives multi-turn chats their cache hits.

/// One chat message, already reduced to plain text by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'a str,
    /// The message text (content parts already concatenated).
    pub content: &'a str,
}

/// Renders `messages` with the built-in template, ending with the assistant generation prompt.
pub fn render_chat(messages: &[ChatMessage<'_>]) -> String {
    let len: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len() + 6)
        .sum();
    let mut out = String::with_capacity(len + 16);
    for m in messages {
        out.push_str("<|");
        out.push_str(m.role);
        out.push_str("|>\n");
        out.push_str(m.content);
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_conversation_renders_to_growing_prefix() {
        let one = [ChatMessage {
            role: "user",
            content: "hi",
        }];
        let two = [
            one[0].clone(),
            ChatMessage {
                role: "assistant",
                content: "hello",
            },
            ChatMessage {
                role: "user",
                content: "more",
            },
        ];
        let a = render_chat(&one);
        let b = render_chat(&two);
        let stem = a.strip_suffix("<|assistant|>\n").unwrap();
        assert!(b.starts_with(stem));
        assert_eq!(a, "<|user|>\nhi\n<|assistant|>\n");
    }
}
