"""The offline visual-QA benchmark: a seeded generator of images and questions whose answers depend
on known patches (``data``), and the word-level tokenizer of its vocabulary (``tokenizer``)."""
