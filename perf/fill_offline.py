# Fills offline persistent sessions fast for the recovery measurement of perf/persist.sh:
# usage: fill_offline.py PORT MESSAGES SESSIONS (3.1.1, QoS 1, 64-byte payloads, topic rec/t).
import socket, struct, sys, threading, time
port=int(sys.argv[1]); n=int(sys.argv[2]); sessions=int(sys.argv[3])
def rl(x):
    out=b''
    while True:
        b=x%128; x//=128
        if x: b|=128
        out+=bytes([b])
        if not x: return out
def s(x): return struct.pack('>H',len(x))+x
def connect(cid, clean):
    body=s(b'MQTT')+bytes([4, 2 if clean else 0])+struct.pack('>H',60)+s(cid)
    return bytes([0x10])+rl(len(body))+body
def recv_exact(sock,k):
    b=b''
    while len(b)<k:
        c=sock.recv(k-len(b))
        if not c: raise SystemExit('closed')
        b+=c
    return b
for i in range(sessions):
    c=socket.create_connection(('127.0.0.1',port))
    c.sendall(connect(b'rec-%d'%i, False)); recv_exact(c,4)
    body=struct.pack('>H',1)+s(b'rec/t')+bytes([1])
    c.sendall(bytes([0x82])+rl(len(body))+body); recv_exact(c,5)
    c.sendall(b'\xe0\x00'); c.close()
p=socket.create_connection(('127.0.0.1',port))
p.sendall(connect(b'rec-pub', True)); recv_exact(p,4)
got=[0]
def reader():
    buf=b''
    while got[0]<n:
        c=p.recv(1<<20)
        if not c: break
        got[0]+=len(c)//4
threading.Thread(target=reader,daemon=True).start()
t=time.time()
chunk=[]
for i in range(n):
    pid=i%65000+1
    body=s(b'rec/t')+struct.pack('>H',pid)+(b'%010d'%i).ljust(64,b'.')
    chunk.append(bytes([0x32])+rl(len(body))+body)
    if len(chunk)==2000:
        p.sendall(b''.join(chunk)); chunk=[]
        while i-got[0] > 20000: time.sleep(0.001)
if chunk: p.sendall(b''.join(chunk))
while got[0]<n: time.sleep(0.01)
print('filled', n, 'in', round(time.time()-t,2),'s')
