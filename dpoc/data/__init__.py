"""`dpoc preprocess`: preference data in, MindSpeed-compatible pairwise Megatron indexed datasets out.

Heavy libraries (transformers, megatron-core, torch) are imported inside functions only, so importing
`dpoc.cli.preprocess` stays cheap for the compiler's command line.
"""
