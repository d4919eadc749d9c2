"""Models: the catalogue and operator policy (catalog), architecture shapes (shape), random-weight
checkpoints (dummy) and provisioning of whatever the user named (sources). Imports run one way:
catalog <- shape <- dummy <- sources."""
