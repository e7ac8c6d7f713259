"""Text: tokenizers (tokenizer.json and SentencePiece, from HF directories and GGUF) and chat
templates rendered in jinja2's sandbox."""
