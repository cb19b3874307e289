"""marker_lab: persona-marker and emergent-misalignment experiments on chat LLMs (see README.md).

Importing it leaves the process's environment as it is: the entry points set what they need before CUDA starts
(core.environment.use_expandable_segments)."""
