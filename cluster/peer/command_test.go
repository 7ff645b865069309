package peer

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"testing"
)

// cmdOwner answers forwarded commands from a script.
type cmdOwner struct {
	err   error
	got   []byte
	nexus string
}

func (o *cmdOwner) RunCommand(_ context.Context, ref Ref, nexus string, cdb, dataOut []byte) (CommandResult, error) {
	if o.err != nil {
		return CommandResult{}, o.err
	}
	o.got, o.nexus = append(append([]byte(nil), cdb...), dataOut...), nexus
	return CommandResult{Status: 0x18, Sense: []byte{0x70, 0, 5}, DataIn: bytes.Repeat([]byte{7}, 3<<20), TransferLen: 3 << 20}, nil
}

// Forwarded commands: the CDB, data and nexus reach the owner; its
// status, sense, data (megabytes of it: a read handed over while a
// reservation exists) and transfer length come back; "not the owner" and
// "unknown image" keep their meaning (the caller looks again); malformed
// calls never reach the owner.
func TestCommands(t *testing.T) {
	ctx := context.Background()
	o := &cmdOwner{}
	_, addr := startServer(t, newStore(), ServerConfig{Commands: o})
	c := newClient(t, addr, ClientConfig{})
	ref := Ref{ID: newID(), Gen: 3}
	cdb := []byte{0x5f, 1, 0, 0, 0, 0, 0, 0, 24, 0}
	res, err := c.RunCommand(ctx, ref, "iqn.a,i,0x1,iqn.t,t,0x0002", cdb, []byte("params"))
	if err != nil {
		t.Fatal(err)
	}
	if string(o.got) != string(cdb)+"params" || o.nexus != "iqn.a,i,0x1,iqn.t,t,0x0002" {
		t.Fatalf("the owner got %q for %q", o.got, o.nexus)
	}
	if res.Status != 0x18 || !bytes.Equal(res.Sense, []byte{0x70, 0, 5}) || len(res.DataIn) != 3<<20 || res.TransferLen != 3<<20 {
		t.Fatalf("answer: status %#x sense %x, %d bytes, transfer %d", res.Status, res.Sense, len(res.DataIn), res.TransferLen)
	}
	o.err = fmt.Errorf("image x: %w", ErrNotOwner)
	_, err = c.RunCommand(ctx, ref, "n", cdb, nil)
	wantErr(t, err, ErrNotOwner)
	o.err = fmt.Errorf("image x: %w", ErrUnknownImage)
	_, err = c.RunCommand(ctx, ref, "n", cdb, nil)
	wantErr(t, err, ErrUnknownImage)

	// Malformed: refused by the client, and by the server when sent raw.
	o.err, o.got = nil, nil
	_, err = c.RunCommand(ctx, ref, "n", cdb[:3], nil)
	wantErr(t, err, ErrBadRequest)
	hc := rawClient(t)
	for _, body := range [][]byte{nil, {40}, {10, 1, 2}, {2, 1, 2}} {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+pathCommand, bytes.NewReader(body))
		req.Header.Set(hID, ref.ID)
		req.Header.Set(hGen, "3")
		req.Header.Set(hNexus, "n")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("body % x: status %d, want 400", body, resp.StatusCode)
		}
	}
	if o.got != nil {
		t.Fatal("a malformed command reached the owner")
	}
	// A node that serves no commands: unknown image (looked up again).
	_, addr2 := startServer(t, newStore(), ServerConfig{})
	_, err = newClient(t, addr2, ClientConfig{}).RunCommand(ctx, ref, "n", cdb, nil)
	wantErr(t, err, ErrUnknownImage)
}
