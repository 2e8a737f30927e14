"""Apache Beam jobs (readers, transforms, face detection, tokenization, shard writing, prepare and mix) and the
sample corpus writer."""
