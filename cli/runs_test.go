package cli

import (
	"reflect"
	"testing"

	"github.com/ukai-storage/ukai/api"
)

func TestRunLines(t *testing.T) {
	locs := []api.Location{{Node: "n1"}, {Node: "n2"}}
	got := RunLines(locs, []api.BlockRun{
		{First: 0, Last: 1023, States: map[string]int{"n1": 0, "n2": 0}},
		{First: 1024, Last: 1535, States: map[string]int{"n1": 0, "n2": 2}},
		{First: 1536, Last: 1536, States: map[string]int{"n1": 1, "n2": 2}},
	})
	want := []string{
		"0-1023 in sync on n1,n2",
		"1024-1535 in sync on n1; out of sync on n2",
		"1536 syncing on n1; out of sync on n2",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
}
