#!/bin/sh
# An AWS Batch array job of 8 children: child i gets AWS_BATCH_JOB_ARRAY_INDEX=i, which
# `--shard auto/8` (in the job definition) reads. The array size must equal the N of
# --shard auto/N. docs/scale.md.
#
#   aws batch register-job-definition --cli-input-json file://deploy/aws-batch/job-definition.json
#   sh deploy/aws-batch/submit.sh my-job-queue
set -eu
queue=${1:?usage: submit.sh JOB_QUEUE}
aws batch submit-job \
  --job-name "segreplay-$(date -u +%Y%m%dT%H%M%S)" \
  --job-queue "$queue" \
  --job-definition segreplay-shard \
  --array-properties size=8
