"""One forward pass, step by step, with the model's own modules, printing shapes and a few values,
then checked against model(tokens).

    python examples/walkthrough.py ["PROMPT"] [MODEL]
"""

import sys

import torch
import torch.nn.functional as F

import plainllama
from plainllama.model import apply_rotary, causal_mask, rotary_cos_sin

prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
llm = plainllama.load(sys.argv[2] if len(sys.argv) > 2 else None, dtype="float32")
model, args = llm.model, llm.model.args


def show(name, t):
    print(f"{name:<34} {str(list(t.shape)):<16} {t.flatten()[:4].tolist()}")


ids = llm.tokenizer.encode(prompt)
print(f"prompt {prompt!r} -> {len(ids)} tokens {ids}")
print(
    f"model: {args.n_layers} layers, width {args.dim}, {args.n_heads} query heads sharing {args.n_kv_heads} "
    "key/value heads\n"
)
tokens = torch.tensor([ids])  # [B=1, T]
B, T = tokens.shape

with torch.inference_mode():
    h = model.tok_embeddings(tokens)  # each id becomes a vector of width D
    show("embedding", h)
    cos, sin = rotary_cos_sin(args, torch.arange(T)[None])  # rotation angle per position and pair of dims
    mask = causal_mask(0, T, tokens.device)  # position i may look at positions 0..i
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        x = layer.attention_norm(h)  # RMSNorm: rescale each vector to unit root-mean-square, times a gain
        qkv = attn.wqkv(x).view(B, T, args.n_heads + 2 * args.n_kv_heads, args.head_dim)  # wq, wk, wv stacked
        q = qkv[:, :, : args.n_heads]  # what each position is looking for
        k = qkv[:, :, args.n_heads : args.n_heads + args.n_kv_heads]  # what each position offers
        v = qkv[:, :, args.n_heads + args.n_kv_heads :]  # what it passes on when chosen
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # RoPE: position by rotation
        k = k.repeat_interleave(args.n_heads // args.n_kv_heads, dim=2)  # GQA: heads share k and v
        v = v.repeat_interleave(args.n_heads // args.n_kv_heads, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / args.head_dim**0.5  # [B, H, T, T]
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # each row sums to 1
        out = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)  # heads side by side
        h = h + attn.wo(out)  # attention's result is added to the residual stream
        ff = layer.feed_forward
        x = layer.ffn_norm(h)
        gate, up = ff.w13(x).chunk(2, dim=-1)  # w1 and w3 stacked
        h = h + ff.w2(F.silu(gate) * up)  # SwiGLU feed-forward, added to the residual stream
        if i in (0, args.n_layers - 1):
            show(f"layer {i}: attention weights", weights)
            show(f"layer {i}: residual stream", h)
    logits = model.output(model.norm(h))  # final norm, then one score per vocabulary entry
    show("logits", logits)
    probs = logits[0, -1].softmax(-1)  # the next-token distribution after the last position
    top = torch.topk(probs, 5)
    print(
        "\nnext token:",
        ", ".join(
            f"{llm.tokenizer.piece(int(i))!r} {float(p):.1%}" for p, i in zip(top.values, top.indices, strict=True)
        ),
    )
    reference = model(tokens)
    difference = (logits - reference).abs().max().item()
    print(f"largest difference from model(tokens): {difference:.2e}")
    assert difference < 1e-3, "the walkthrough no longer matches the model"
