"""The names the command line offers as choices and in its help, known without importing torch so that
`--help` and argument errors are instant. Each mirrors the registry the commands use once they run;
tests/test_cli_startup.py checks that they agree."""

# mambamerge.merge.METHODS, sorted
METHODS = ("evit", "mame", "mtr", "random", "rmeeto", "stm", "tome", "tome_unordered", "top")
# mambamerge.models.list_models(): the short names, then the official long names
MODELS = ("aum_base", "aum_nano", "aum_small", "aum_tiny", "videomamba_middle", "videomamba_nano",
          "videomamba_small", "videomamba_tiny", "vim_base", "vim_nano", "vim_pico", "vim_small", "vim_small_plus",
          "vim_tiny", "vim_tiny_plus",
          "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
          "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
          "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
          "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
          "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
# mambamerge.devices.AMP_CHOICES
AMP_CHOICES = ("none", "bf16", "fp16")
# mambamerge.diagnostics.report.PARTS
DIAGNOSTIC_PARTS = ("decay", "attention", "dependence", "order", "importance", "prune_vs_merge")
