"""Training data: rows from files and Hub datasets (rows), formatted, tokenized and mixed (load), preference
pairs (preference), the held-out split as prompts and answers (heldout); the Korean sample and pairs shipped as
package data (ko_sample.jsonl; ko_pairs.jsonl, made by make_pairs.py). May import kit.core, kit.models, kit.config
and kit.run."""
