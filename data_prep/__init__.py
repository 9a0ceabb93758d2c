"""data_prep: raw text -> cleaned, deduplicated, tokenized Arrow shards (`megatrain prep`)."""
