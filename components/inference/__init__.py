"""Torch-free CLIP inference that several stages and commands share: the exported ONNX bundle
(`onnx_clip`: the filter's CLIP-score rule, the export's parity check, the registered pyfunc,
`clipflow zeroshot`) and the prompt templates and class-name presets (`prompts`). Below the stages: it
imports only clip_model and components.common."""
