"""The data pipeline: corpus.txt -> tokenizer.json -> train.bin / val.bin / data.json."""
