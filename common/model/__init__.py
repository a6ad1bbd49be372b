"""model/: the model's side, shared by train, evaluate, merge, quantize and serve.

loading.py (device, dtype, bitsandbytes 8/4-bit, base+adapter or merged), memory.py (fit counted from the
model's shapes, the KV budget, placement), files.py (is a model directory complete, manifests, atomic
writes, newest run), tiny_qwen.py (the offline tiny Qwen3), batching.py (left padding, positions),
label_scoring.py (every label's probability from one prompt pass). May import text/ and the top of common/.
"""
