"""Values every stage of the data flow and the losses agree on."""

# the label of a position that carries no loss (the default ignore_index of torch's cross-entropy)
IGNORE_INDEX = -100
