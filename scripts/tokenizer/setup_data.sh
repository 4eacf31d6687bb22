echo "tokenizer data: not yet"
