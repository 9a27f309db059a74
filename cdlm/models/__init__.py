"""Model definition (transformer), checkpoint layouts and loading. Import the submodules."""
