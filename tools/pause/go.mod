// The node tier's sandbox (pause) image: a static binary that waits for a
// signal and reaps orphaned children, packed as a one-layer OCI image by
// scripts/build-images.sh (no registry holds one for this machine).
module turnstorm/tools/pause

go 1.26.0
