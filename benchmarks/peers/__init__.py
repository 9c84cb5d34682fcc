"""Peer engines run side by side with ours (vLLM's CPU build, llama.cpp), each in its own virtual environment;
never a dependency of the project and not run in CI."""
