package peer

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// Forwarded SCSI commands: the commands that must run on the LU of an
// image's owner with the initiator's nexus (reservations, COMPARE AND
// WRITE; target/scsi remote.go). They are rare, so they use the data
// transport's HTTP/2 side, not the block protocol:
//
//	POST /peer/v1/command   Ukai-Id, Ukai-Gen, Ukai-Nexus headers
//	  body:   CDB length (1 byte), CDB, data-out
//	  answer: 200, body: status (1 byte), sense length (1 byte), transfer
//	          length (4 bytes, big-endian: what the CDB asked for, for the
//	          initiator's residual count), sense, data-in
//
// Any other answer is an error, mapped like the other calls' (421: not the
// owner, 404: unknown image or a node that serves no commands).

const (
	pathCommand = "/peer/v1/command"
	hNexus      = "Ukai-Nexus"
	// maxCommandData bounds a command's data-out and data-in: while a
	// reservation exists, every read and write through a node that is not
	// the owner is handed over whole, so it is the largest transfer an LU
	// advertises (32 MiB, node/images.go) plus a block of slack.
	maxCommandData = 32<<20 + 4096
	maxNexus       = 1024
)

// Commands is the owner's side of forwarded commands.
type Commands interface {
	// RunCommand runs a command on image ref's LU on behalf of nexus, or
	// fails (an error wrapping ErrNotOwner when this node is not the
	// owner: the caller looks again).
	RunCommand(ctx context.Context, ref Ref, nexus string, cdb, dataOut []byte) (CommandResult, error)
}

// CommandResult is a forwarded command's SCSI outcome.
type CommandResult struct {
	Status      byte
	Sense       []byte
	DataIn      []byte
	TransferLen uint32
}

func (s *Server) command(w http.ResponseWriter, r *http.Request) {
	s.handlers.Add(1)
	defer s.handlers.Done()
	res, err := s.serveCommand(r)
	if err != nil {
		s.reply(w, r, "command", s.status(r.Context(), err), err)
		return
	}
	out := make([]byte, 0, 6+len(res.Sense)+len(res.DataIn))
	out = append(out, res.Status, byte(len(res.Sense)))
	out = binary.BigEndian.AppendUint32(out, res.TransferLen)
	out = append(out, res.Sense...)
	out = append(out, res.DataIn...)
	w.Header().Set("Content-Length", strconv.Itoa(len(out)))
	w.WriteHeader(http.StatusOK)
	w.Write(out)
}

func (s *Server) serveCommand(r *http.Request) (CommandResult, error) {
	if s.cfg.Commands == nil {
		return CommandResult{}, fmt.Errorf("%w: this node serves no forwarded commands", ErrUnknownImage)
	}
	if r.TLS != nil && (s.cfg.Member == nil || !s.cfg.Member(certNode(r.TLS))) {
		return CommandResult{}, fmt.Errorf("%w: forwarded commands are served only to members of the cluster (certificate %q)", ErrForbidden, certNode(r.TLS))
	}
	id := r.Header.Get(hID)
	if !validID(id) {
		return CommandResult{}, fmt.Errorf("%w: image id %q is not 32 hex digits", ErrBadRequest, id)
	}
	gen, err := headerUint(r.Header, hGen)
	if err != nil {
		return CommandResult{}, err
	}
	nexus := r.Header.Get(hNexus)
	if nexus == "" || len(nexus) > maxNexus {
		return CommandResult{}, fmt.Errorf("%w: nexus of %d bytes", ErrBadRequest, len(nexus))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxCommandData+257))
	if err != nil {
		return CommandResult{}, fmt.Errorf("%w: read the command: %v", ErrUnavailable, err)
	}
	if len(body) < 1 || int(body[0]) < 6 || int(body[0]) > 32 || len(body) < 1+int(body[0]) || len(body) > 1+int(body[0])+maxCommandData {
		return CommandResult{}, fmt.Errorf("%w: malformed command body of %d bytes", ErrBadRequest, len(body))
	}
	cdb := body[1 : 1+int(body[0])]
	res, err := s.cfg.Commands.RunCommand(r.Context(), Ref{ID: id, Gen: gen}, nexus, cdb, body[1+int(body[0]):])
	if err != nil {
		return res, err
	}
	if len(res.Sense) > 255 || len(res.DataIn) > maxCommandData {
		return CommandResult{}, fmt.Errorf("command result too large: sense %d, data %d bytes", len(res.Sense), len(res.DataIn))
	}
	return res, nil
}

// RunCommand runs a SCSI command on image ref's owner (the peer), on
// behalf of nexus. A returned error means the command may or may not have
// run (like a forwarded write, it is never resent).
func (c *Client) RunCommand(ctx context.Context, ref Ref, nexus string, cdb, dataOut []byte) (CommandResult, error) {
	const op = "command"
	if len(cdb) < 6 || len(cdb) > 32 || len(dataOut) > maxCommandData || nexus == "" || len(nexus) > maxNexus {
		return CommandResult{}, fmt.Errorf("peer %s: %s: %w: CDB %d, data %d, nexus %d bytes", c.addr, op, ErrBadRequest, len(cdb), len(dataOut), len(nexus))
	}
	if c.closed.Load() {
		return CommandResult{}, fmt.Errorf("peer %s: %s: %w: %v", c.addr, op, ErrUnavailable, errClosed)
	}
	k := c.begin(ctx, op)
	defer k.finish()
	body := make([]byte, 0, 1+len(cdb)+len(dataOut))
	body = append(append(append(body, byte(len(cdb))), cdb...), dataOut...)
	req, err := http.NewRequestWithContext(k.ctx, http.MethodPost, c.base+pathCommand, bytes.NewReader(body))
	if err != nil {
		return CommandResult{}, fmt.Errorf("peer %s: %s: %w", c.addr, op, err)
	}
	req.Header[hID] = []string{ref.ID}
	req.Header[hGen] = []string{strconv.FormatUint(ref.Gen, 10)}
	req.Header[hNexus] = []string{nexus}
	resp, err := c.hc.Do(req)
	if err != nil {
		return CommandResult{}, k.fail(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrBody))
		switch resp.StatusCode {
		case http.StatusMisdirectedRequest:
			// Not the owner, nothing run: the caller looks again.
			return CommandResult{}, fmt.Errorf("peer %s: %s: %w: %s", c.addr, op, ErrNotOwner, msg)
		case http.StatusNotFound:
			// The image not loaded yet (a restart), or a node that serves
			// no commands: nothing run either.
			return CommandResult{}, fmt.Errorf("peer %s: %s: %w: %s", c.addr, op, ErrUnknownImage, msg)
		}
		return CommandResult{}, k.statusErr(resp.StatusCode, string(msg))
	}
	out, err := io.ReadAll(io.LimitReader(resp.Body, 6+255+maxCommandData+1))
	if err != nil {
		return CommandResult{}, k.fail(err)
	}
	if len(out) < 6 || len(out) < 6+int(out[1]) || len(out) > 6+int(out[1])+maxCommandData {
		return CommandResult{}, fmt.Errorf("peer %s: %s: %w: malformed answer of %d bytes", c.addr, op, ErrUnavailable, len(out))
	}
	res := CommandResult{Status: out[0], TransferLen: binary.BigEndian.Uint32(out[2:6]), Sense: out[6 : 6+int(out[1])], DataIn: out[6+int(out[1]):]}
	return res, nil
}
