"""What the real-time heads' Hugging Face models (``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``,
``DFineForObjectDetection``) name alike: their encoder (the Hub's ``encoder.encoder.N``, ``out_proj``, ``fc1`` or
transformers 5's ``encoder.aifi.N``, ``o_proj``, ``mlp.fc1``), query selection, decoder layers and heads, mapped
onto RT-DETR's names, which ours are; each head adds its own."""

from __future__ import annotations

from ..hugging_face import Renames

HUGGING_FACE_BACKBONE = r"^model\.backbone\.(?:conv_encoder\.)?model\."
REALTIME_RENAMES: Renames = (
    (r"^model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (r"^model\.encoder\.(?:aifi|encoder)\.", "encoder.encoder."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
    (r"^model\.enc_output\.0\.", "decoder.enc_output.proj."),
    (r"^model\.enc_output\.1\.", "decoder.enc_output.norm."),
    (r"^model\.(denoising_class_embed|enc_score_head|enc_bbox_head)\.", r"decoder.\1."),
    (r"^model\.decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^model\.decoder\.query_pos_head\.", "decoder.query_pos_head."),
    (r"^model\.decoder\.layers\.", "decoder.decoder.layers."),
    (r"^(encoder\.encoder\.\d+\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(encoder\.encoder\.\d+\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"\.final_layer_norm\.", ".norm3."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
)
# the top-level copies of the decoder's heads (tied), and the attention's derived point scales (RT-DETRv2's and
# D-FINE's names)
REALTIME_DROPPED = (r"^(class_embed|bbox_embed)\.", r"\.n(?:um)?_points_scale$")
