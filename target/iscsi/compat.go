package iscsi

import "github.com/ukai-storage/ukai/target/scsi"

// resultAborted reports a Result the LU dropped (no response is sent).
func resultAborted(r *scsi.Result) bool { return r.Aborted }
