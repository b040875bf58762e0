"""The recipes users run: llama31_sft (SFT; DPO and ORPO by train.method) and dpo (DPO or ORPO), each a short
list of the steps they share (steps), with the shipped YAML recipes as package data (the checkout's recipes/ holds
the same files). The top of the kit: may import every package."""
