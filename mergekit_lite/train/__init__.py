"""Post-training: losses (and, as they land, the trainers) that produce merge inputs."""
