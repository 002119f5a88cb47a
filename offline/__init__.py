"""The offline world: a synthetic data set, and the stage-0 stand-ins for a pretrained CLIP and LLM.

See offline/README.md.
"""
