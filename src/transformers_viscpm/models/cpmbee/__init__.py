"""CPM-Bee: tokenizer, structured-input encoder, language model."""


def register() -> None:
    """Register CPM-Bee with the transformers Auto classes (filled in as the pieces land)."""
