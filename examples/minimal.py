"""Generate text with the loop written out: tokenize, run the model with a cache, pick, decode.

python examples/minimal.py ["PROMPT"] [MODEL]
"""

import sys

import torch

import plainllama
from plainllama.model import KVCache

prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
llm = plainllama.load(sys.argv[2] if len(sys.argv) > 2 else None)  # default: the bundled SmolLM2
model, tokenizer = llm.model, llm.tokenizer

ids = tokenizer.encode(prompt)  # text -> token ids
cache = KVCache(model.args, batch=1, length=len(ids) + 32, dtype=llm.dtype, device=llm.device)
tokens = torch.tensor([ids], device=llm.device)  # [1, T]
position = 0
generated = []
with torch.inference_mode():
    for _ in range(32):
        logits = model(tokens, start_pos=position, cache=cache)  # [1, T, vocab]
        position += tokens.shape[1]  # the cache now holds these positions
        next_id = int(logits[0, -1].argmax())  # greedy: the most likely next token
        if next_id in tokenizer.end_ids:
            break
        generated.append(next_id)
        tokens = torch.tensor([[next_id]], device=llm.device)  # only the new token goes in next time
print(prompt + tokenizer.decode(generated))
