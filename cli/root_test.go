package cli

import (
	"bytes"
	"strings"
	"testing"
)

// run runs the CLI with args and no node behind --api (the commands under
// test fail or succeed before they would call one).
func runCLI(args ...string) (string, error) {
	root := NewRoot("test")
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"--api", "127.0.0.1:1"}, args...))
	err := root.Execute()
	return out.String(), err
}

// TestUnknownSubcommands: a subcommand a group does not have is an error
// naming it, with a suggestion when one is close; a bare group prints its
// help; ls and rm are the short names of list, delete and remove.
func TestUnknownSubcommands(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		wantErr string
	}{
		{[]string{"image", "frobnicate", "vm7"}, `unknown command "frobnicate" for "ukai image"`},
		{[]string{"image", "creat", "vm7"}, `did you mean create?`},
		{[]string{"snapshot", "lst", "vm1"}, `unknown command "lst" for "ukai snapshot"`},
		{[]string{"node", "cordn", "n1"}, `did you mean cordon?`},
		{[]string{"policy", "nosuch"}, `unknown command "nosuch" for "ukai policy"`},
	} {
		_, err := runCLI(tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("ukai %s: %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.wantErr)
		}
	}
	if out, err := runCLI("image"); err != nil || !strings.Contains(out, "Available Commands") {
		t.Errorf("bare `ukai image`: %v\n%s", err, out)
	}
	// The aliases resolve to the real commands (which then fail on the
	// node that is not there, not as unknown commands).
	for _, args := range [][]string{{"image", "ls"}, {"image", "rm", "vm7"}, {"snapshot", "ls", "vm1"}, {"snapshot", "rm", "vm1", "s1"}, {"location", "rm", "vm1", "n1"}, {"node", "ls"}} {
		_, err := runCLI(args...)
		if err == nil || strings.Contains(err.Error(), "unknown command") {
			t.Errorf("ukai %s: %v, want the command to run (and fail to reach the node)", strings.Join(args, " "), err)
		}
	}
}

// TestHelpWithoutBoolNoise: help texts list boolean flags without pflag's
// "[=true|false]".
func TestHelpWithoutBoolNoise(t *testing.T) {
	out, err := runCLI("image", "info", "--help")
	if err != nil || !strings.Contains(out, "--blocks") || !strings.Contains(out, "--help") {
		t.Fatalf("help: %v\n%s", err, out)
	}
	if strings.Contains(out, "[=true|false]") {
		t.Fatalf("help still shows [=true|false]:\n%s", out)
	}
}
