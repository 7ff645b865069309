package node

import "testing"

// TestMustReconcile: a takeover after a clean release ("" as the previous
// owner) reconciles too. Before, it skipped the activity log that a
// release keeps for its successor when blocks could not be made to agree
// or writes arrived while it flushed, and copies could stay different
// while both in sync.
func TestMustReconcile(t *testing.T) {
	for _, tc := range []struct {
		previous  string
		everOwned bool
		want      bool
	}{
		{"n2", false, true}, // takeover from a dead or fenced owner
		{"n2", true, true},  // the same, after owning it once
		{"", false, true},   // after a clean release by another node
		{"", true, true},    // after a release, even this node's own
		{"n1", false, true}, // this node's name, from a previous process
		{"n1", true, false}, // this process held it and nobody took it since
	} {
		if got := mustReconcile(tc.previous, "n1", tc.everOwned); got != tc.want {
			t.Errorf("mustReconcile(%q, n1, everOwned=%v) = %v, want %v", tc.previous, tc.everOwned, got, tc.want)
		}
	}
}
