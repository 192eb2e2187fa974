r"""Every tokenizer kind at (roughly) equal bits per image on the same data and model size.

At 32×32 with 4×4 patches (64 tokens): VQ 1024 codes (640 bits), BSQ 10 bits per token (640),
VAR multi-scale VQ with 16 codes over 155 tokens (620), Infinity multi-scale BSQ with 5 bits over
121 tokens (605), LARP 64 queries × 1024 codes (640), and the continuous ViTok bottleneck at c = 10
(640 floats) for reference. The table's `code_bits` column is the code size from the record. The
learned VQ codebooks use dead-code restart every 50 steps. arg: variant options for every run,
replacing the base's (e.g. steps=50).

  vitok sweep tokenizer_kinds --sweep_dir runs/tokenizer_kinds
"""
import ml_collections

from vitok_jax import config_lib

# One row per kind (variant options; 0 = the option's default / off).
KINDS = {
    "quantizer": ["gaussian", "vq1k", "bsq", "msvq", "msbsq", "larp"],
    "c":         [10,         8,      10,    8,      5,       8],
    "codebook":  [0,          0,      0,     16,     0,       1024],
    "queries":   [0,          0,      0,     0,      0,       64],
    "restart":   [0,          50,     0,     50,     0,       0],
}


def get_config(arg: str = ""):
  sweep = ml_collections.ConfigDict()
  sweep.name = "tokenizer_kinds"
  sweep.base = "vitok:" + config_lib.with_options(
      "Mu-Mi/4,res=32,data=mnist,batch=32,steps=500,lr=1e-3", arg)
  sweep.axes = [("zip", KINDS)]
  sweep.max_attempts = 2
  sweep.parallel = 1
  sweep.metric = "eval/psnr"
  sweep.fits = []
  return sweep
